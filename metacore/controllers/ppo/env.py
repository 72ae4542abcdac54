"""``metacore/HyperparamControl-v0``: a gymnasium environment whose episode is one real training run.

The run is driven by the very :class:`~metacore.core.trainer.Trainer` of ``metacore run`` (``advance(interval)`` per
decision), with a small controller inside it that applies the agent's action and collects gradient statistics.

* **Episode**: a task is drawn (``task`` may be a list), a run seed is drawn, and the initial learning rate is drawn
  log-uniformly in ``[default / lr_spread, default * lr_spread]`` (clipped to the task's bounds); the other
  hyperparameters keep the task's defaults. The budget is ``interval * horizon`` optimizer steps.
* **Observation**: the task-agnostic features of :mod:`metacore.controllers.ppo.features` (``Box(-5, 5, (12,))``;
  the budget phase is the first of them, ``progress``), plus the residual ``log_lr_vs_teacher`` with a teacher.
* **Action**: one value in [-1, 1] per controlled hyperparameter (``lr`` by default). Without a teacher the value in
  force is multiplied by ``exp(action * max_log_step)`` (by default a factor between 1/2 and 2 per decision). With
  ``teacher="autolr"`` (any registered controller) the teacher runs inside the episode every step and the value in
  force is the teacher's times ``exp(residual)``, the action moving the residual by ``action * max_log_step``
  (:mod:`metacore.controllers.ppo.residual`): actions of 0 reproduce the teacher's run exactly.
* **Reward** (``reward="delta"``, the default): the change of the validation score ``-log(error)`` (see
  :func:`~metacore.controllers.ppo.features.score`) since the previous decision, so the undiscounted return is the log
  error-reduction ratio of the whole run, comparable across tasks. ``reward="final"``: 0 until the last decision,
  then the whole run's score gain, so only the final validation score counts whatever the discount.
  ``reward="teacher"`` (needs a ``teacher``): 0 until the last decision, then the run's final score minus the final
  score of the teacher's own run on the same task, seed and initial rate (the residual held at 0, run to the end at
  the episode's reset): the return is the gain over the rule, paired so that the seed's and the start's luck cancel.
  The teacher's run costs one more run per episode, counted in the step's ``teacher_steps``. A rollback costs
  ``rollback_penalty``; a diverged run ends the episode and gives back all its progress plus
  ``divergence_penalty``.

Data are loaded once per task per environment (from ``data_seed``) and shared by its episodes. The id is registered
with gymnasium in one place, the package's ``__init__`` (its import runs before this module's).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from metacore.controllers.ppo.features import CLIP, FEATURES, FeatureTracker, score
from metacore.controllers.ppo.residual import TEACHER_FEATURE, Residual, ResidualHost
from metacore.core.controller import Controller, StepContext
from metacore.core.errors import UsageError
from metacore.core.state import TrainingState

REWARDS = ("delta", "final", "teacher")


class _EnvController(ResidualHost, Controller):
    """Applies the agent's pending action at the next step and records gradient statistics."""

    name = "ppo-env"

    def __init__(self, tracker: FeatureTracker, residual: Residual | None = None) -> None:
        super().__init__()
        self.tracker = tracker
        self.residual = residual
        self.pending: dict[str, float] = {}  # without a teacher: the new values; with one: the residual steps

    def reset(self, hparams, seed, space, budget) -> None:
        super().reset(hparams, seed, space, budget)
        if self.residual is not None:
            self.residual.reset(hparams, seed, space, budget)

    def observe_gradients(self, ctx: StepContext) -> None:
        self.tracker.grads.observe(ctx.grads)
        self._pass_gradients(ctx)

    def act(self, state: TrainingState) -> dict[str, Any]:
        changes, self.pending = self.pending, {}
        if self.residual is None:
            return changes
        self.residual.nudge(changes)
        return self.residual.act(state)

    def on_rollback(self, hparams: Mapping[str, float]) -> None:
        if self.residual is not None:
            self.residual.on_rollback(hparams)

    def state_dict(self) -> dict[str, Any]:
        out = self.tracker.state_dict()
        if self.residual is not None:
            out["residual"] = self.residual.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state)
        if self.residual is not None and "residual" in state:
            self.residual.load_state_dict(state["residual"])


class HyperparamControlEnv(gym.Env):
    """One training run per episode; the agent changes hyperparameters every ``interval`` optimizer steps."""

    metadata = {"render_modes": []}

    def __init__(self, task: str | Sequence[str] = "digits", preset: str = "smoke", interval: int | None = None,
                 horizon: int = 10, seed: int | None = None, *, hparams: Sequence[str] = ("lr",),
                 max_log_step: float = math.log(2.0), lr_spread: float = 10.0, data_dir: str | None = None,
                 device: str = "cpu", task_options: Mapping[str, Any] | None = None,
                 rollback_penalty: float = 0.2, divergence_penalty: float = 1.0, teacher: str | None = None,
                 teacher_options: Mapping[str, Any] | None = None, reward: str = "delta") -> None:
        from metacore.core.registry import load_registry

        super().__init__()
        names = [task] if isinstance(task, str) else list(task)
        if not names:
            raise UsageError("HyperparamControl needs at least one task")
        if horizon < 1:
            raise UsageError(f"horizon must be at least 1, got {horizon}")
        registry = load_registry()
        self.tasks = {n: registry.task(n).obj() for n in names}
        self.task_names = names
        self.preset_name = preset
        self.presets = {n: t.preset(preset) for n, t in self.tasks.items()}
        self.options = {n: t.resolve_options(self.presets[n], dict(task_options or {})) for n, t in self.tasks.items()}
        for n, t in self.tasks.items():
            space = t.hparam_space()
            for h in ("lr", *hparams):
                if h not in space:
                    raise UsageError(f"task {n} has no hyperparameter {h!r} to control")
        if reward not in REWARDS:
            raise UsageError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        self.teacher = None if teacher in (None, "", "none") else str(teacher)
        self.teacher_options = dict(teacher_options or {})
        if reward == "teacher" and self.teacher is None:
            raise UsageError("reward 'teacher' pays the gain over the teacher's own run: it needs a teacher")
        if self.teacher is not None:
            Residual(self.teacher, self.teacher_options, hparams)  # an unknown teacher or bad options: fail now
        self.reward_mode = reward
        self.interval_arg = interval
        self.horizon = int(horizon)
        self.hparam_names = list(hparams)
        self.max_log_step = float(max_log_step)
        self.lr_spread = float(lr_spread)
        self.data_dir = data_dir
        self.device = device
        self.rollback_penalty = float(rollback_penalty)
        self.divergence_penalty = float(divergence_penalty)
        self.data_seed = 0 if seed is None else int(seed)
        self._seed = seed
        self.features = list(FEATURES) + ([TEACHER_FEATURE] if self.teacher else [])
        self.observation_space = spaces.Box(-CLIP, CLIP, shape=(len(self.features),), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(len(self.hparam_names),), dtype=np.float32)
        self._data: dict[str, Any] = {}
        self.trainer = None
        self.episode_info: dict[str, Any] = {}

    def interval_for(self, name: str) -> int:
        return int(self.interval_arg or max(1, self.presets[name].steps // self.horizon))

    def _load(self, name: str, ctx) -> Any:
        if name not in self._data:
            self._data[name] = self.tasks[name].load_data(ctx)
        return self._data[name]

    # ------------------------------------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and self._seed is not None and self.trainer is None:
            seed = self._seed
        super().reset(seed=seed)
        rng = self.np_random
        name = self.task_names[int(rng.integers(len(self.task_names)))]
        lr_spec = self.tasks[name].hparam_space()["lr"]
        lr0 = lr_spec.clip(lr_spec.default * math.exp(rng.uniform(-1, 1) * math.log(self.lr_spread)))
        run_seed = int(rng.integers(2**31 - 1))
        return self._start(name, run_seed, lr0)

    def restore_episode(self, info: Mapping[str, Any], rng_state: Mapping[str, Any]) -> np.ndarray:
        """The state right after the reset that drew ``info`` (its ``episode_info``), with the episode generator's
        state ``rng_state`` (``np_random.bit_generator.state``): a meta-training checkpoint's resume. The run is
        rebuilt from its task, seed and initial rate, so it is the very run the reset started."""
        obs, _ = self._start(str(info["task"]), int(info["seed"]), float(info["lr0"]), info.get("teacher_score"))
        self.np_random.bit_generator.state = dict(rng_state)
        return obs

    def snapshot(self) -> dict[str, Any]:
        """What :meth:`restore` needs to put this environment back exactly where it is (between two steps): the
        episode's draw, the episode generator, and, in the middle of a run, the run's full trainer checkpoint."""
        out: dict[str, Any] = {"episode_info": dict(self.episode_info),
                               "rng": dict(self.np_random.bit_generator.state)}
        if self.trainer is not None and self.trainer.step > 0:
            out["run"] = {"trainer": self.trainer.checkpoint_payload(), "score0": self.score0, "score": self.score,
                          "rollbacks": self.rollbacks, "pending": dict(self.controller.pending)}
        return out

    def restore(self, snap: Mapping[str, Any]) -> np.ndarray | None:
        """Back to a :meth:`snapshot`; returns the observation at that point (None before the first reset)."""
        obs = None
        if snap.get("episode_info"):
            obs = self.restore_episode(snap["episode_info"], snap["rng"])
            run = snap.get("run")
            if run:
                self.trainer.restore(run["trainer"])
                self.score0, self.score = float(run["score0"]), float(run["score"])
                self.rollbacks = int(run["rollbacks"])
                self.controller.pending = dict(run["pending"])
                obs = None  # the features of a restored run are the tracker's, not recomputed: no observation
        self.np_random.bit_generator.state = dict(snap["rng"])
        return obs

    def _build(self, name: str, run_seed: int, lr0: float):
        """A fresh run of ``name`` from ``lr0`` with this environment's controller for it (agent-driven or, with no
        pending action ever, the teacher's own run) and its initial validation score."""
        from metacore.core.task import TaskContext
        from metacore.core.trainer import Trainer, TrainerConfig

        task, preset = self.tasks[name], self.presets[name]
        space = task.hparam_space()
        hparams = space.defaults()
        hparams["lr"] = lr0
        interval = self.interval_for(name)
        log_interval = preset.log_interval if interval % preset.log_interval == 0 else interval
        config = TrainerConfig(budget=interval * self.horizon, log_interval=log_interval, eval_interval=interval)
        data = self._load(name, TaskContext(preset, dict(self.options[name]), self.data_seed, self.device,
                                            _path(self.data_dir), dict(hparams)))
        ctx = TaskContext(preset, dict(self.options[name]), run_seed, self.device, _path(self.data_dir),
                          dict(hparams))
        tracker = FeatureTracker(hparams["lr"], space["lr"].default)
        residual = Residual(self.teacher, self.teacher_options, self.hparam_names) if self.teacher else None
        controller = _EnvController(tracker, residual)
        trainer = Trainer(task, controller, ctx, hparams, config, data=data)
        score0 = score(trainer.evaluate("val", record=False)[task.primary_metric], task.direction)
        return trainer, controller, tracker, interval, score0

    def _teacher_score(self, name: str, run_seed: int, lr0: float) -> float:
        """The final validation score of the teacher's own run (residual 0 throughout), decision by decision as an
        episode runs; a run that diverges for good scores as it started."""
        trainer, _, _, interval, score0 = self._build(name, run_seed, lr0)
        for _ in range(self.horizon):
            trainer.advance(interval)
            if trainer.diverged:
                return score0
        trainer.evaluate("val")
        value = trainer.val_metrics.get(self.tasks[name].primary_metric, math.nan)
        return score(value, self.tasks[name].direction) if math.isfinite(value) else score0

    def _start(self, name: str, run_seed: int, lr0: float, teacher_score: float | None = None):
        task = self.tasks[name]
        self.teacher_score = None
        if self.reward_mode == "teacher":  # before the episode's run is built, which re-seeds the generators
            self.teacher_score = (self._teacher_score(name, run_seed, lr0) if teacher_score is None
                                  else float(teacher_score))
        self.trainer, self.controller, self.tracker, self.interval, self.score0 = self._build(name, run_seed, lr0)
        self.task_name = name
        self.direction = task.direction
        self.primary = task.primary_metric
        self.score = self.score0
        self.rollbacks = 0
        self.episode_info = {"task": name, "seed": run_seed, "lr0": float(lr0),
                             "interval": self.interval}
        if self.teacher_score is not None:
            self.episode_info["teacher_score"] = self.teacher_score
        return self._observe(self.trainer.state()), dict(self.episode_info)

    def step(self, action):
        if self.trainer is None:
            raise RuntimeError("call reset() before step()")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        state = self.trainer.state()
        if self.teacher:  # residual steps, applied on top of the teacher's values from the next step on
            self.controller.pending = {h: float(x) * self.max_log_step for h, x in zip(self.hparam_names, a,
                                                                                      strict=True)}
        else:
            self.controller.pending = {h: float(state.hparams[h]) * math.exp(float(x) * self.max_log_step)
                                       for h, x in zip(self.hparam_names, a, strict=True)}
        state = self.trainer.advance(self.interval)
        trainer = self.trainer
        new_rollbacks = trainer.rollbacks - self.rollbacks
        self.rollbacks = trainer.rollbacks
        reward = -self.rollback_penalty * new_rollbacks
        terminated = False
        if trainer.diverged:  # "delta" gives back what it paid so far; "final" paid nothing yet
            reward += -(self.score - self.score0) * (self.reward_mode == "delta") - self.divergence_penalty
            if self.reward_mode == "teacher":  # the run's gain counts as none, against the teacher's
                reward += self.score0 - self.teacher_score
            terminated = True
        else:
            if trainer.step >= trainer.config.budget:
                trainer.evaluate("val")
                terminated = True
                state = trainer.state()
            value = trainer.val_metrics.get(self.primary, math.nan)
            new_score = score(value, self.direction) if math.isfinite(value) else self.score
            if self.reward_mode == "delta":
                reward += new_score - self.score
            elif terminated and self.reward_mode == "final":  # the whole run's gain, once
                reward += new_score - self.score0
            elif terminated:  # "teacher": the gain over the teacher's own run, once
                reward += new_score - self.teacher_score
            self.score = new_score
        obs = self._observe(state)
        info = {**self.episode_info, "step": trainer.step, "lr": float(state.hparams["lr"]),
                "score": self.score - self.score0, "val": trainer.val_metrics.get(self.primary, math.nan),
                "diverged": trainer.diverged}
        if terminated and self.teacher_score is not None:  # the compute of the teacher's run, once per episode
            info["teacher_steps"] = trainer.config.budget
        return obs, float(reward), terminated, False, info

    def _observe(self, state: TrainingState) -> np.ndarray:
        feats = self.tracker.features(state, self.tracker.grads.take())
        if self.controller.residual is not None:
            feats.append(max(-CLIP, min(CLIP, self.controller.residual.feature("lr"))))
        return np.asarray(feats, dtype=np.float32)

    def close(self) -> None:
        self.trainer = None
        self._data.clear()


def _path(p: str | None):
    from pathlib import Path

    return Path(p) if p else None

