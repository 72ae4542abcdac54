"""The ``ppo`` controller: runs a meta-trained policy deterministically inside ``metacore run``.

This is the module the plugin registry imports, so it imports neither torch, gymnasium nor stable-baselines3 at module
level. The policy (``--controller-set policy=PATH``, default the shipped one) is checked when the controller is
built, before any run is written, and loaded when the run starts.

Every ``interval`` steps (default: the budget divided by the policy's horizon, the decision rate it was trained at)
the controller computes the task-agnostic features (:mod:`metacore.controllers.ppo.features`), asks the policy for an
action in [-1, 1] per controlled hyperparameter and multiplies each by ``exp(action * max_log_step)``. A residual
policy (its JSON names a ``teacher``, e.g. ``autolr``) runs that controller inside itself every step and multiplies
the teacher's values by ``exp(residual)`` instead, each action moving the residual
(:mod:`metacore.controllers.ppo.residual`), exactly as in the environment it was meta-trained in.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from metacore.controllers.ppo.features import FeatureTracker
from metacore.controllers.ppo.residual import ResidualHost
from metacore.core.controller import Controller, StepContext
from metacore.core.errors import ControllerError
from metacore.core.hookspecs import hookimpl
from metacore.core.hparams import HParamSpace
from metacore.core.options import OptionSpec
from metacore.core.state import TrainingState


class PPOController(ResidualHost, Controller):
    """A meta-trained PPO policy acting on the learning rate from task-agnostic training signals."""

    name = "ppo"
    description = "meta-trained PPO policy (stable-baselines3) adjusting lr from task-agnostic signals"
    options = {
        "policy": OptionSpec("policy", "default", str, "policy .json/.safetensors or meta-train output folder; "
                             "'default' is the shipped policy"),
        "interval": OptionSpec("interval", 0, int, "optimizer steps per decision; 0: budget / the policy's horizon",
                               0, None),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        from metacore.controllers.ppo.policy import read_spec

        self.policy_path, self.spec, _ = read_spec(self.config["policy"])  # a bad policy fails before any run
        teacher = self.spec.get("teacher")
        if teacher:
            from metacore.controllers.ppo.residual import make_teacher

            try:
                make_teacher(teacher["name"], teacher.get("options"))  # unknown or bad: fails before any run too
            except Exception as exc:
                raise ControllerError(f"policy {self.policy_path}: its teacher cannot be built ({exc})") from None
        self.residual = None
        self.policy = None
        self.tracker: FeatureTracker | None = None
        self.interval = 1
        self._grad: dict[str, float] | None = None
        self._last_factor = 1.0
        self._decisions = 0

    def reset(self, hparams: Mapping[str, float], seed: int, space: HParamSpace, budget: int) -> None:
        from metacore.controllers.ppo.policy import load_policy

        super().reset(hparams, seed, space, budget)
        self.policy = load_policy(self.policy_path)
        missing = [h for h in self.policy.hparams if h not in space]
        if missing or "lr" not in space:
            raise ControllerError(f"policy {self.policy_path} controls {', '.join(self.policy.hparams)}, but the "
                                  f"task has no {', '.join(missing or ['lr'])}")
        self.interval = self.config["interval"] or max(1, budget // self.policy.horizon)
        self.tracker = FeatureTracker(hparams["lr"], space["lr"].default)
        self._grad = None
        self._decisions = 0
        teacher = self.policy.teacher
        if teacher:
            from metacore.controllers.ppo.residual import Residual

            self.residual = Residual(teacher["name"], teacher.get("options"), self.policy.hparams)
            self.residual.reset(hparams, seed, space, budget)

    # GradientObserver capability ------------------------------------------------------------------------------
    def observe_gradients(self, ctx: StepContext) -> None:
        if ctx.step % self.interval == 0:  # a decision step: close the interval before this step's gradient
            self._grad = self.tracker.grads.take()
        self.tracker.grads.observe(ctx.grads)
        self._pass_gradients(ctx)

    def act(self, state: TrainingState) -> dict[str, Any]:
        if self.residual is not None:
            return self._act_residual(state)
        if state.step % self.interval != 0:
            return {}
        features = self.tracker.features(state, self._grad)
        actions = self.policy.act(features)
        self._decisions += 1
        changes = {}
        for name, a in zip(self.policy.hparams, actions, strict=True):
            factor = math.exp(a * self.policy.max_log_step)
            value = state.hparams[name] * factor
            changes[name] = self.space[name].clip(value) if self.space is not None and name in self.space else value
            if name == "lr":
                self._last_factor = factor
        return changes

    def _act_residual(self, state: TrainingState) -> dict[str, Any]:
        """A decision step: the residual moves; every step: the teacher acts and the residual scales its values."""
        if state.step % self.interval == 0:
            from metacore.controllers.ppo.features import CLIP

            features = self.tracker.features(state, self._grad)
            features.append(max(-CLIP, min(CLIP, self.residual.feature("lr"))))
            actions = self.policy.act(features)
            self._decisions += 1
            steps = {h: a * self.policy.max_log_step for h, a in zip(self.policy.hparams, actions, strict=True)}
            self.residual.nudge(steps)
            self._last_factor = math.exp(steps.get("lr", 0.0))
        return self.residual.act(state)

    def on_rollback(self, hparams: Mapping[str, float]) -> None:
        if self.residual is not None:
            self.residual.on_rollback(hparams)

    def diagnostics(self) -> dict[str, float]:
        out = {"lr_factor": self._last_factor, "decisions": float(self._decisions)}
        if self.residual is not None:
            out.update(self.residual.diagnostics())
        return out

    def state_dict(self) -> dict[str, Any]:
        out = dict(self.tracker.state_dict()) if self.tracker else {}
        out.update(decisions=self._decisions, last_factor=self._last_factor)
        if self.residual is not None:
            out["residual"] = self.residual.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.residual is not None and "residual" in state:
            self.residual.load_state_dict(state["residual"])
        if self.tracker:
            self.tracker.load_state_dict(state)
        self._decisions = int(state.get("decisions", self._decisions))
        self._last_factor = float(state.get("last_factor", self._last_factor))


@hookimpl
def metacore_register_controllers(register):
    register(PPOController)
