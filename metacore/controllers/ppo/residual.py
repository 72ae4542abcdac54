"""A residual policy over a hand-made rule: the teacher controller runs inside the policy's controller.

The teacher (``autolr`` by default in the documentation, any registered controller works) is a full controller: it
is reset with the run, sees every step (``act``, and ``observe_gradients``/``after_step`` when it observes gradients,
so ``autolr``'s keep/go-back still works) and proposes its own values. The values put in force are the teacher's
times ``exp(residual)`` per controlled hyperparameter; the policy moves the residual by ``action * max_log_step`` at
each decision. With a residual of 0 every decision the run *is* the teacher's run, step for step (tested), so a
policy whose actions are 0 reproduces the rule and PPO only has to learn corrections to it.

The teacher always sees its own values, never the scaled ones: the state it acts on, the step context it observes
and the values ``on_rollback`` tells it about are divided by the residual factor. Its proposals are sanitized
against the task's space first, as the driver would sanitize them were it running alone.

The residual itself is one more observation feature (:data:`TEACHER_FEATURE`), so the policy knows how far it has
moved away from the rule; it is clamped to ``[-limit, limit]`` (in log units).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from metacore.core.controller import Controller, GradientObserver, StepContext, TensorRates
from metacore.core.errors import UsageError
from metacore.core.hparams import HParamSpace
from metacore.core.state import TrainingState

TEACHER_FEATURE = "log_lr_vs_teacher"  # log(lr in force / the teacher's lr): the residual
RESIDUAL_LIMIT = 5.0  # |residual| <= 5 (a factor of about 150 either way), the features' clip


def make_teacher(name: str, options: Mapping[str, Any] | None = None) -> Controller:
    """A registered controller by name (a :class:`UsageError` naming the registered ones otherwise)."""
    from metacore.core.registry import load_registry

    registry = load_registry()
    if name not in registry.controllers or name == "ppo":
        known = ", ".join(sorted(c for c in registry.controllers if c != "ppo"))
        raise UsageError(f"unknown teacher {name!r} (registered controllers: {known})")
    return registry.controller(name).obj(**dict(options or {}))


def _float(v: Any) -> float:
    return float(v.item()) if hasattr(v, "item") else float(v)


class Residual:
    """Runs ``teacher`` and multiplies the values it proposes for ``hparams`` by ``exp(residual)``."""

    def __init__(self, teacher: str, options: Mapping[str, Any] | None = None, hparams: Sequence[str] = ("lr",),
                 limit: float = RESIDUAL_LIMIT) -> None:
        self.teacher_name = teacher
        self.teacher_options = dict(options or {})
        self.teacher = make_teacher(teacher, self.teacher_options)
        self.names = list(hparams)
        self.limit = float(limit)
        self.observer = isinstance(self.teacher, GradientObserver)
        self.residual: dict[str, float] = {h: 0.0 for h in self.names}
        self.view: dict[str, Any] = {}  # the teacher's own values
        self.space: HParamSpace | None = None
        self._ctx: StepContext | None = None

    # ------------------------------------------------------------------------------------------------ a run
    def reset(self, hparams: Mapping[str, float], seed: int, space: HParamSpace, budget: int) -> None:
        self.space = space
        self.view = dict(hparams)
        self.residual = {h: 0.0 for h in self.names}
        self._ctx = None
        self.teacher.reset(dict(hparams), seed, space, budget)

    def nudge(self, steps: Mapping[str, float]) -> None:
        """Move the residual of each named hyperparameter by ``steps[name]`` (log units), within the limit."""
        for h, x in steps.items():
            self.residual[h] = max(-self.limit, min(self.limit, self.residual[h] + float(x)))

    def feature(self, name: str = "lr") -> float:
        return self.residual.get(name, 0.0)

    # ------------------------------------------------------------------------------------------------ the teacher
    def observe_gradients(self, ctx: StepContext) -> None:
        if self.observer:
            self._ctx = dataclasses.replace(ctx, hparams=self.view)
            self.teacher.observe_gradients(self._ctx)

    def tensor_rates(self, ctx: StepContext) -> Sequence[float] | None:
        """The teacher's per-tensor rates (``autolr``'s layer rates), unchanged: the residual scales only ``lr``."""
        if self.observer and isinstance(self.teacher, TensorRates):
            return self.teacher.tensor_rates(self._ctx or ctx)  # the teacher's view, set by observe_gradients
        return None

    def after_step(self, ctx: StepContext) -> None:
        if self.observer and self._ctx is not None:
            self.teacher.after_step(self._ctx)
        self._ctx = None

    def act(self, state: TrainingState) -> dict[str, Any]:
        """The teacher's proposal with the residual applied; only the values that change."""
        own = {k: (_float(self.view[k]) if k in self.view else v) for k, v in state.hparams.items()}
        raw = self.teacher.act(dataclasses.replace(state, hparams=own)) or {}
        if raw:
            self.view.update(self.space.sanitize(dict(raw), self.teacher_name) if self.space is not None else raw)
        out = {k: self.view[k] for k in raw if k not in self.residual}
        for h, r in self.residual.items():
            value = self.view[h] * math.exp(r) if r else self.view[h]
            if r and self.space is not None and h in self.space:  # scaled past the task's bounds: clipped, as the
                value = self.space.sanitize({h: value}, "ppo")[h]  # driver would (the value in force is the same)
            if h in raw or _float(value) != state.hparams.get(h):
                out[h] = value
        return out

    def on_rollback(self, hparams: Mapping[str, float]) -> None:
        own = dict(hparams)
        for h, r in self.residual.items():
            if h in own:
                own[h] = own[h] / math.exp(r)
        self.view.update(own)
        self.teacher.on_rollback(own)

    def diagnostics(self) -> dict[str, float]:
        out = {f"teacher_{k}": v for k, v in self.teacher.diagnostics().items()}
        out.update({f"residual_{h}": r for h, r in self.residual.items()})
        return out

    # tensors and plain values only (a trainer checkpoint loads with weights_only)
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "residual": dict(self.residual),
                "view": {k: (v.detach().clone() if hasattr(v, "detach") else v) for k, v in self.view.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.teacher.load_state_dict(state.get("teacher", {}))
        self.residual.update({h: float(r) for h, r in state.get("residual", {}).items()})
        self.view.update(state.get("view", {}))


class ResidualHost:
    """Mixin of a controller that may drive a :class:`Residual`: the calls it passes on to the teacher unchanged."""

    residual: Residual | None = None

    def after_step(self, ctx: StepContext) -> None:
        if self.residual is not None:
            self.residual.after_step(ctx)

    def tensor_rates(self, ctx: StepContext) -> Sequence[float] | None:
        return self.residual.tensor_rates(ctx) if self.residual is not None else None

    def _pass_gradients(self, ctx: StepContext) -> None:
        if self.residual is not None:
            self.residual.observe_gradients(ctx)
