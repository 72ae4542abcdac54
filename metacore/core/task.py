"""The Task interface: a model, its data, its loss and its metrics, with a declared hyperparameter space.

Data are map-style: each split is a tuple of tensors whose first dimension indexes examples. The trainer owns the
data order (a permutation per epoch drawn from the run's seed), so a controller run and its baseline see exactly the
same batches, a resumed run continues at the same example, and the batch size may change between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from metacore.core.errors import UsageError
from metacore.core.hparams import HParamSpace
from metacore.core.options import OptionSet, OptionSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class Preset:
    """A task scale: ``full`` (the seed's setup), ``small`` (minutes on a laptop CPU), ``smoke`` (seconds)."""

    name: str
    steps: int
    eval_interval: int
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0: only at the end
    options: Mapping[str, Any] = field(default_factory=dict)  # task-option values this preset implies
    description: str = ""


@dataclass
class TaskContext:
    """What a task needs to build itself for one run."""

    preset: Preset
    options: dict[str, Any]
    seed: int
    device: Any = "cpu"
    data_dir: Path | None = None
    hparams: dict[str, float] = field(default_factory=dict)

    @property
    def on_cuda(self) -> bool:
        """The run is on a CUDA device: tasks switch on their GPU fast path (fused optimizers, channels_last)."""
        return str(self.device).startswith("cuda")


@dataclass
class TaskData:
    """Splits as tuples of tensors; ``info`` is logged as run parameters (sizes, sources, scaling)."""

    train: tuple
    val: tuple
    test: tuple
    info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> tuple:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def train_size(self) -> int:
        return int(self.train[0].shape[0])


class Task:
    """Base class of task plugins. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    primary_metric: ClassVar[str] = "accuracy"
    metrics: ClassVar[dict[str, str]] = {"accuracy": "max"}  # metric name -> "max" | "min"
    default_baseline: ClassVar[str] = "static"
    eval_batch_size: ClassVar[int] = 512
    # the model trains and evaluates correctly under bf16 autocast: on CUDA (``--precision auto``) the trainer runs the
    # loss and evaluation in ``torch.autocast(dtype=bfloat16)``; weights, optimizer state and the loss stay float32
    bf16_autocast: ClassVar[bool] = False
    # the registered optimizers (``--optimizer``) this task can train with; None: any
    optimizers: ClassVar[tuple[str, ...] | None] = None

    # --- declarations -------------------------------------------------------------------------------------------
    def hparam_space(self) -> HParamSpace:
        raise NotImplementedError

    def presets(self) -> dict[str, Preset]:
        raise NotImplementedError

    def option_specs(self) -> dict[str, OptionSpec]:
        return {}

    def controller_defaults(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Controller options this task implies (e.g. its warmup length), given its resolved task options.

        Each applies to any controller (or baseline) that declares an option of that name, unless the user set it
        with ``--controller-set``.
        """
        return {}

    @property
    def direction(self) -> str:
        return self.metrics[self.primary_metric]

    def preset(self, name: str) -> Preset:
        presets = self.presets()
        if name not in presets:
            raise UsageError(f"unknown preset {name!r} for task {self.name} (known: {', '.join(presets)})")
        return presets[name]

    def resolve_options(self, preset: Preset, given: Mapping[str, Any]) -> dict[str, Any]:
        """Option defaults, then the preset's values, then the user's (validated)."""
        options = OptionSet(f"task {self.name}", self.option_specs())
        values = options.resolve(dict(preset.options))
        if given:  # only the keys the user gave; the rest keep the preset's values
            values.update({k: v for k, v in options.resolve(dict(given)).items() if k in given})
        return {k: values[k] for k in values}

    # --- building -----------------------------------------------------------------------------------------------
    def load_data(self, ctx: TaskContext) -> TaskData:
        raise NotImplementedError

    def build_model(self, data: TaskData, ctx: TaskContext) -> torch.nn.Module:
        raise NotImplementedError

    def build_optimizer(self, model: torch.nn.Module, hparams: Mapping[str, float], ctx: TaskContext):
        raise NotImplementedError

    def optimizer_metrics(self, optimizer: Any) -> dict[str, float]:
        """Step metrics about the optimizer, logged at logging intervals (``hparam/effective_lr`` for a
        learning-rate-free optimizer chosen with ``--optimizer``); none for the task's own."""
        return {}

    # --- per step -----------------------------------------------------------------------------------------------
    def train_batch(self, data: TaskData, indices: torch.Tensor, ctx: TaskContext) -> tuple:
        """The training batch for these example indices, on the run's device (override to augment)."""
        return tuple(t[indices].to(ctx.device, non_blocking=True) for t in data.train)

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        """Mean loss of a batch ``(inputs, targets)``; the default is cross-entropy on logits."""
        import torch.nn.functional as F

        inputs, targets = batch[0], batch[1]
        return F.cross_entropy(model(inputs), targets)

    def apply_model_hparam(self, model: torch.nn.Module, name: str, value: float) -> None:
        """Apply a ``model`` hyperparameter; the default handles ``dropout`` on every ``nn.Dropout``."""
        import torch.nn as nn

        if name != "dropout":
            raise NotImplementedError(f"task {self.name} declares model hyperparameter {name!r} but does not apply it")
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = float(value)

    # --- evaluation ---------------------------------------------------------------------------------------------
    def eval_batches(self, data: TaskData, split: str, ctx: TaskContext):
        tensors = data.split(split)
        n = int(tensors[0].shape[0])
        for start in range(0, n, self.eval_batch_size):
            yield tuple(t[start : start + self.eval_batch_size].to(ctx.device, non_blocking=True) for t in tensors)

    def evaluate(self, model: torch.nn.Module, data: TaskData, split: str, ctx: TaskContext) -> dict[str, float]:
        """Metrics of ``split``: model outputs gathered over eval batches, then :meth:`compute_metrics`."""
        import torch

        outputs, targets = [], []
        with torch.no_grad():
            for batch in self.eval_batches(data, split, ctx):
                outputs.append(model(batch[0]).float().cpu())
                targets.append(batch[1].cpu())
        return self.compute_metrics(torch.cat(outputs), torch.cat(targets), data)

    def compute_metrics(self, outputs: torch.Tensor, targets: torch.Tensor, data: TaskData) -> dict[str, float]:
        """Classification by default: accuracy and macro F1 from logits."""
        from metacore.core.metrics import classification_metrics

        return classification_metrics(outputs, targets)
