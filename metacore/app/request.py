"""What a ``metacore run`` is asked to do: the request the command-line flags (``metacore.commands.flags``) fill
and the programmatic API (:func:`metacore.app.runner.run`) takes. Imports nothing beyond the standard library, so the
CLI can build its parser from these defaults without loading the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRECISIONS = ("auto", "fp32")


@dataclass
class RunRequest:
    task: str
    controller: str
    baseline: str | None = "static"  # None: no baseline
    preset: str = "small"
    steps: int | None = None
    epochs: float | None = None
    seed: int = 0
    seeds: int = 1
    sets: dict[str, str] = field(default_factory=dict)
    controller_sets: dict[str, str] = field(default_factory=dict)
    data_dir: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    device: str = "auto"
    checkpoint_interval: int | None = None
    checkpoint_dir: str | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA where the task declares it safe; fp32: never
    compile: bool = False  # torch.compile the model for training
    optimizer: str | None = None  # a registered optimizer (--optimizer); None or "default": the task's own
