"""``plateau``: reduce the learning rate when the primary validation metric stops improving.

It reads only the :class:`metacore.TrainingState` (``val_history``, ``direction``), returns only what it changes,
and keeps plain values in its state, so checkpoints and resumed runs reproduce it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metacore import Controller, OptionSpec, TrainingState


class PlateauController(Controller):
    """Multiply lr by ``factor`` after ``patience`` evaluations without improvement (like ReduceLROnPlateau)."""

    name = "plateau"
    description = "multiply lr by `factor` when the validation metric stalls for `patience` evaluations"
    options = {
        "patience": OptionSpec("patience", 2, int, "evaluations without improvement before a reduction", 1, None),
        "factor": OptionSpec("factor", 0.5, float, "multiplier of lr at each reduction", 0.01, 0.99),
        "min_delta": OptionSpec("min_delta", 0.0, float, "smallest change that counts as an improvement", 0.0, None),
    }

    def reset(self, hparams: Mapping[str, float], seed: int, space, budget: int) -> None:
        super().reset(hparams, seed, space, budget)
        self.best: float | None = None
        self.bad = 0  # evaluations since the last improvement
        self.seen = 0  # evaluations already read from val_history
        self.lr = float(hparams.get("lr", 0.0))
        self.reductions = 0

    def act(self, state: TrainingState) -> dict[str, Any]:
        if "lr" not in state.hparams or len(state.val_history) <= self.seen:
            return {}
        sign = 1.0 if state.direction == "max" else -1.0
        reduce = False
        for value in state.val_history[self.seen:]:
            if self.best is None or sign * (value - self.best) > self.config["min_delta"]:
                self.best, self.bad = value, 0
            else:
                self.bad += 1
                if self.bad >= self.config["patience"]:
                    reduce, self.bad = True, 0
        self.seen = len(state.val_history)
        if not reduce:
            return {}
        self.lr *= self.config["factor"]
        self.reductions += 1
        return {"lr": self.lr}

    def on_rollback(self, hparams: Mapping[str, float]) -> None:
        self.lr = float(hparams.get("lr", self.lr))  # the trainer halved it; continue from there

    def diagnostics(self) -> dict[str, float]:
        return {"reductions": float(self.reductions), "bad_evals": float(self.bad)}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "seen": self.seen, "lr": self.lr, "reductions": self.reductions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.bad, self.seen = int(state["bad"]), int(state["seen"])
        self.lr, self.reductions = float(state["lr"]), int(state["reductions"])
