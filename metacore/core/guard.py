"""Divergence guarding: the last good in-memory snapshot, the test for a diverging loss, and what a rollback restores.

The trainer reads its loss back only at logging intervals, so that is where the guard looks: a non-finite mean loss,
or one ``explode_factor`` times the first finite one, means the run is diverging. The guard then restores the weights
and optimizer state of the last snapshot (taken at the previous good interval) and hands back the hyperparameters
to put in force, with the learning rate halved; after ``max_rollbacks`` it gives up and the run has diverged (the
last good weights are what gets evaluated).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping

from metacore.core.hparams import HParamSpace
from metacore.core.values import to_float


@dataclass
class Snapshot:
    step: int
    model: dict
    optimizer: dict
    controller: dict
    hparams: dict


@dataclass
class Rollback:
    """What to put in force after a rollback; ``gave_up``: the run has diverged (the controller is not told)."""

    hparams: dict[str, Any]
    controller: dict
    gave_up: bool


class DivergenceGuard:
    def __init__(self, space: HParamSpace, *, explode_factor: float = 1e3, max_rollbacks: int = 5,
                 lr_name: str = "lr") -> None:
        self.space = space
        self.explode_factor, self.max_rollbacks, self.lr_name = explode_factor, max_rollbacks, lr_name
        self.first_loss: float | None = None
        self.rollbacks = 0
        self.diverged = False
        self.snapshot: Snapshot | None = None

    def diverging(self, mean_loss: float) -> bool:
        """Whether a logged mean loss says the run is diverging (the first finite one sets the scale)."""
        if self.first_loss is None and math.isfinite(mean_loss):
            self.first_loss = max(abs(mean_loss), 1e-8)
        exploded = self.first_loss is not None and abs(mean_loss) > self.explode_factor * self.first_loss
        return not math.isfinite(mean_loss) or exploded

    def remember(self, step: int, model: Any, optimizer: Any, controller_state: Mapping[str, Any],
                 hparams: Mapping[str, Any]) -> None:
        """Take the snapshot a later rollback restores (tensors cloned on their device)."""
        self.snapshot = Snapshot(step=step, model=clone_state(model.state_dict()),
                                 optimizer=clone_state(optimizer.state_dict()),
                                 controller=clone_state(dict(controller_state)), hparams=dict(hparams))

    def roll_back(self, model: Any, optimizer: Any) -> Rollback:
        """Restore the snapshot's weights and optimizer state, count the rollback; the values to put in force."""
        self.rollbacks += 1
        snap = self.snapshot
        model.load_state_dict(snap.model)
        optimizer.load_state_dict(snap.optimizer)
        hparams = dict(snap.hparams)
        if self.rollbacks > self.max_rollbacks:
            self.diverged = True
            return Rollback(hparams, snap.controller, gave_up=True)
        if self.lr_name in self.space:
            spec = self.space[self.lr_name]
            hparams[spec.name] = spec.clip(to_float(hparams[spec.name]) * 0.5)
        return Rollback(hparams, snap.controller, gave_up=False)

    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self.first_loss, "rollbacks": self.rollbacks, "diverged": self.diverged}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.first_loss = state["first_loss"]
        self.rollbacks = int(state["rollbacks"])
        self.diverged = bool(state.get("diverged", False))


def clone_state(obj: Any) -> Any:
    """Deep copy of a state dict, tensors cloned on their device (a snapshot, not a checkpoint). Walks dicts, lists
    and tuples itself: ``copy.deepcopy`` costs far more Python per tensor, and this runs every logging interval."""
    if hasattr(obj, "detach") and hasattr(obj, "clone"):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, clone_state(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module's state dict carries its version metadata
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(clone_state(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return copy.deepcopy(obj)
