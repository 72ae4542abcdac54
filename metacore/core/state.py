"""What a controller sees: a frozen snapshot of scalars, never the trainer or its tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


def _frozen(d: Mapping[str, float] | None) -> Mapping[str, float]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class TrainingState:
    """A snapshot taken before each optimizer step.

    Loss values are the ones read back at the last logging interval (reading the loss every step would force a GPU
    sync); ``train_losses`` holds the recent logged means, oldest first. ``hparams`` are the values in force.
    """

    step: int
    epoch: float
    budget: int
    train_loss: float
    train_losses: tuple[float, ...]
    val_metrics: Mapping[str, float]
    hparams: Mapping[str, float]
    primary_metric: str
    direction: str  # "max" or "min"
    val_history: tuple[float, ...] = ()  # the primary validation metric at each evaluation so far
    rollbacks: int = 0
    extra: Mapping[str, float] = field(default_factory=lambda: _frozen(None))

    @property
    def progress(self) -> float:
        """Fraction of the step budget spent, in [0, 1]."""
        return min(1.0, self.step / self.budget) if self.budget else 0.0
