"""The Controller interface and its optional capabilities.

A controller is called by the trainer before every optimizer step with a :class:`TrainingState` and returns only the
hyperparameters it changes. Its state (``state_dict``) holds tensors and plain values only, so checkpoints load with
``torch.load(weights_only=True)``.

Optional capabilities are detected, not required:

* :class:`GradientObserver` — ``observe_gradients(ctx)`` runs between ``backward()`` and ``optimizer.step()`` and
  ``after_step(ctx)`` right after the step (a hypergradient controller needs the current gradient and the update the
  optimizer just made). ``ctx.val_loss_and_grads()`` computes the loss and gradients of a validation batch, for
  controllers that adapt to held-out performance.
* :class:`TensorRates` — ``tensor_rates(ctx)``, asked right after ``observe_gradients``: a multiplier of the learning
  rate per parameter of ``ctx.params`` (or ``None``). The driver scales each parameter's update by its multiplier
  right after the optimizer step, before ``after_step``: the same as a per-tensor learning rate, for any optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

from metacore.core.hparams import HParamSpace
from metacore.core.options import OptionSet, OptionSpec
from metacore.core.state import TrainingState

if TYPE_CHECKING:  # pragma: no cover
    import torch


class Controller:
    """Base class of controller plugins."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, OptionSpec]] = {}

    def __init__(self, **options: Any) -> None:
        self.config: dict[str, Any] = OptionSet(f"controller {self.name}", dict(self.options)).resolve(options)
        self.space: HParamSpace | None = None
        self.initial: dict[str, float] = {}
        self.seed = 0
        self.budget = 0

    def reset(self, hparams: Mapping[str, float], seed: int, space: HParamSpace, budget: int) -> None:
        """Start of a run: the initial hyperparameters, the run's seed, the task's space and the step budget."""
        self.initial = dict(hparams)
        self.seed = seed
        self.space = space
        self.budget = budget

    def act(self, state: TrainingState) -> dict[str, Any]:
        """The hyperparameters to change before this step (only those that change)."""
        return {}

    def on_rollback(self, hparams: Mapping[str, float]) -> None:
        """The trainer restored a snapshot after a divergence and set ``hparams`` (learning rate halved)."""

    def diagnostics(self) -> dict[str, float]:
        """Scalars logged as ``controller/<name>`` at logging intervals (may be tensors; read back only then)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass
class StepContext:
    """What a gradient-observing controller gets each step; tensors, never copied."""

    step: int
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    optimizer: Any
    hparams: Mapping[str, Any]
    val_loss_and_grads: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]
    loss: Any = None  # this step's training loss (a 0-dim tensor, not read back), where the integration has it
    # Where the integration supports it: keep the model and optimizer state as they are after this step (one in-memory
    # copy, replacing the previous one), or go back to that copy after this step (returns False when there is none).
    # A controller that explores (a range test, a look-ahead branch) uses them to undo what the exploration cost.
    keep: Callable[[], None] | None = None
    go_back: Callable[[], bool] | None = None


@runtime_checkable
class GradientObserver(Protocol):
    def observe_gradients(self, ctx: StepContext) -> None: ...

    def after_step(self, ctx: StepContext) -> None: ...


@runtime_checkable
class TensorRates(Protocol):
    """A gradient observer that also sets per-tensor rates: one multiplier per ``ctx.params`` entry (1.0: as the
    optimizer stepped it), or ``None`` for none this step. The driver applies ``p = before + m * (after - before)``."""

    def tensor_rates(self, ctx: StepContext) -> Sequence[float] | None: ...
