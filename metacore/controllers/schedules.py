"""Fixed learning-rate schedules as baselines: ``cosine`` and ``linear-warmup`` (Hugging Face's default schedule).

A schedule multiplies the initial learning rate by a factor of the step. After a divergence rollback the trainer
halves the rate; the schedule keeps that as a persistent scale so it does not undo the halving. Values stay inside
the task's declared bounds (a warmup starting at 0 starts at the lower bound).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from metacore.core.controller import Controller
from metacore.core.hookspecs import hookimpl
from metacore.core.options import OptionSpec
from metacore.core.state import TrainingState


class _Schedule(Controller):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.scale = 1.0

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def act(self, state: TrainingState) -> dict[str, Any]:
        if "lr" not in self.initial:
            return {}
        lr = self.initial["lr"] * self.scale * self.factor(state.step)
        if self.space is not None and "lr" in self.space:
            lr = self.space["lr"].clip(lr)  # a warmup from 0 or a decay to 0 stops at the declared lower bound
        return {"lr": lr} if lr != state.hparams.get("lr") else {}

    def on_rollback(self, hparams: Mapping[str, float]) -> None:
        self.scale *= 0.5

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state.get("scale", 1.0))


class CosineSchedule(_Schedule):
    """Cosine annealing of the learning rate from its initial value to ``min_factor`` times it."""

    name = "cosine"
    description = "cosine annealing of lr over the step budget"
    options = {
        "min_factor": OptionSpec("min_factor", 0.0, float, "final lr as a fraction of the initial lr", 0.0, 1.0),
        "warmup_steps": OptionSpec("warmup_steps", 0, int, "linear warmup steps before the decay", 0, None),
    }

    def factor(self, step: int) -> float:
        warmup = self.config["warmup_steps"]
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, self.budget - warmup)
        t = min(1.0, (step - warmup) / span)
        lo = self.config["min_factor"]
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))


class LinearWarmupSchedule(_Schedule):
    """Linear warmup then linear decay to zero (``transformers.get_linear_schedule_with_warmup``)."""

    name = "linear-warmup"
    description = "linear warmup then linear decay to 0 (Hugging Face's default)"
    options = {
        "warmup_steps": OptionSpec("warmup_steps", -1, int, "warmup steps; -1: 10% of the budget", -1, None),
    }

    def factor(self, step: int) -> float:
        warmup = self.config["warmup_steps"]
        if warmup < 0:
            warmup = max(1, self.budget // 10)
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (self.budget - step) / max(1, self.budget - warmup))


@hookimpl
def metacore_register_controllers(register):
    register(CosineSchedule)
    register(LinearWarmupSchedule)
