"""Planning a ``metacore run``: everything the user gave is validated, and every object a run needs is built,
before anything is written, so bad input leaves no half-made run behind. :func:`plan_resume` rebuilds the plan of an
interrupted run from its parent run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacore.app.request import PRECISIONS, RunRequest
from metacore.core.errors import UsageError
from metacore.core.optimizer import check_build, controller_notes, select_optimizer
from metacore.core.registry import Registry, load_registry
from metacore.core.store import Tracker, default_tracking_uri
from metacore.core.task import Preset, Task, TaskContext, TaskData


@dataclass
class Role:
    """One side of a run: ``role`` (controller|baseline), the registered controller's name, its class and options.

    The controller built while planning (which validated the options) serves the first child run; later seeds get
    fresh ones, so each child run's controller is instantiated exactly once.
    """

    role: str
    name: str
    cls: type
    config: dict[str, Any]
    _validated: Any = field(default=None, repr=False, compare=False)

    def controller(self) -> Any:
        made, self._validated = self._validated, None
        return made if made is not None else self.cls(**self.config)

    def __iter__(self):  # unpacks and indexes as the (role, name, class, options) tuple plans used to hold
        return iter((self.role, self.name, self.cls, self.config))

    def __getitem__(self, index: int) -> Any:
        return tuple(self)[index]

    def __len__(self) -> int:
        return 4


@dataclass
class Plan:
    """A validated request: the objects a run needs, built before any side effect."""

    request: RunRequest
    task: Task
    preset: Preset
    options: dict[str, Any]
    hparams: dict[str, float]
    roles: list[Role]
    device: str
    data_dir: Path | None
    plugins: dict[str, str]  # name -> plugin it came from
    optimizer: Any = None  # the chosen Optimizer plugin; None: the task builds its own
    notes: list[str] = field(default_factory=list)  # what each controller adapts on top of the optimizer


def plan_run(request: RunRequest, registry: Registry | None = None) -> Plan:
    registry = registry or load_registry()
    task_entry = registry.task(request.task)
    task, optimizer, sets = select_optimizer(registry, task_entry.obj(), request.optimizer, request.sets)
    preset = task.preset(request.preset)
    space = task.hparam_space()
    hp_given = {k: v for k, v in sets.items() if k in space}
    opt_given = {k: v for k, v in sets.items() if k not in space}
    unknown = [k for k in opt_given if k not in task.option_specs()]
    if unknown:
        extra = f"; optimizer {optimizer.name} options: {', '.join(optimizer.options) or 'none'}" if optimizer else ""
        raise UsageError(
            f"unknown hyperparameter or option {unknown[0]!r} for task {task.name} "
            f"(hyperparameters: {', '.join(space.names())}; options: {', '.join(task.option_specs()) or 'none'}"
            f"{extra})"
        )
    hparams = space.resolve(hp_given)
    options = task.resolve_options(preset, opt_given)
    if request.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {request.precision!r}")
    if request.steps is not None and request.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {request.steps}")
    if request.epochs is not None and not request.epochs > 0:
        raise UsageError(f"--epochs must be positive, got {request.epochs}")
    if request.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {request.seeds}")
    if request.checkpoint_interval is not None and request.checkpoint_interval < 0:
        raise UsageError(f"--checkpoint-interval must be >= 0, got {request.checkpoint_interval}")

    suggested = task.controller_defaults(options)
    # a controller that reads runs back (replay) looks in this run's store by default
    suggested = {"tracking_uri": request.tracking_uri or default_tracking_uri(), **suggested}

    def _role(role: str, entry: Any, given: dict[str, Any]) -> Role:  # the task's suggestions, then the user's
        cls = entry.obj
        controller = cls(**{**{k: v for k, v in suggested.items() if k in cls.options}, **given})
        return Role(role, entry.name, cls, controller.config, controller)

    ctrl_entry = registry.controller(request.controller)
    roles = [_role("controller", ctrl_entry, request.controller_sets)]
    plugins = {task.name: task_entry.plugin, ctrl_entry.name: ctrl_entry.plugin}
    if request.baseline:
        base_entry = registry.controller(request.baseline)
        roles.append(_role("baseline", base_entry, {}))
        plugins[base_entry.name] = base_entry.plugin
    notes = controller_notes(optimizer, roles, space)
    data_dir = request.data_dir or os.environ.get("METACORE_DATA_DIR")
    if data_dir and not Path(data_dir).is_dir():
        raise UsageError(f"data directory {data_dir} does not exist")
    device = resolve_device(request.device)
    if optimizer is not None:
        check_build(optimizer, hparams, TaskContext(preset, dict(options), request.seed, "cpu", None, dict(hparams)))
    return Plan(request, task, preset, options, hparams, roles, device, Path(data_dir) if data_dir else None,
                plugins, optimizer, notes)


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    return device


def budget_steps(plan: Plan, data: TaskData, hparams: dict[str, float]) -> int:
    req = plan.request
    if req.steps is not None:
        return req.steps
    if req.epochs is not None:
        per_epoch = max(1, data.train_size // int(hparams.get("batch_size", 32)))
        return max(1, round(req.epochs * per_epoch))
    return plan.preset.steps


def plan_resume(parent_id: str, tracker: Tracker, registry: Registry | None = None,
                device: str | None = None) -> Plan:
    """The plan of an interrupted ``metacore run``, rebuilt from its parent run (same options as the first time)."""
    parent = tracker.get_run(parent_id)
    if parent is None or parent.tags.get("metacore.role") != "parent":
        raise UsageError(f"--resume: no metacore parent run with id {parent_id!r} in {tracker.uri}")
    if parent.status == "FINISHED":
        raise UsageError(f"--resume: run {parent_id} already finished; nothing to resume")
    fields = json.loads(parent.tags["metacore.request"])
    fields.setdefault("precision", "fp32")  # runs from before --precision trained without autocast
    if device:
        fields["device"] = device
    return plan_run(RunRequest(**fields), registry)
