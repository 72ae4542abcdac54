"""Meta-training: stable-baselines3 PPO across tasks, then the policy written as safetensors + JSON.

One environment per training task, vectorised (``DummyVecEnv``: the runs are small and the CPUs are few, so one
process steps them in turn), observations normalised by ``VecNormalize`` (its running mean and variance are saved in
the policy JSON and applied by the controller), and rewards normalised for the value function only.

The meta-training curves (episode return per task, final validation score per task, PPO's losses) are logged to
MLflow in the ``meta-train`` experiment; at the end the new policy runs on the held-out task against ``static`` (and
``hypergrad`` when it is registered) through ``metacore run``'s own runner, and the results go into the policy JSON.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacore.controllers.ppo.features import FEATURES
from metacore.core.errors import UsageError

PPO_DEFAULTS = {"learning_rate": 3e-4, "gamma": 0.95, "gae_lambda": 0.9, "n_epochs": 10, "clip_range": 0.2,
                "ent_coef": 0.0, "hidden": [64, 64]}


@dataclass
class MetaTrainRequest:
    tasks: list[str]
    hold_out: str | None
    timesteps: int
    out: str
    preset: str = "smoke"
    eval_preset: str | None = None  # default: same as preset
    interval: int | None = None
    horizon: int = 10
    seed: int = 0
    eval_seeds: int = 3
    eval_controllers: list[str] = field(default_factory=lambda: ["static", "hypergrad"])
    data_dir: str | None = None
    tracking_uri: str | None = None
    experiment: str = "meta-train"
    name: str = "policy"
    command: str = ""
    lr_spread: float = 10.0


def validate(req: MetaTrainRequest) -> None:
    from metacore.core.registry import load_registry

    registry = load_registry()
    if not req.tasks:
        raise UsageError("--tasks needs at least one task")
    if len(set(req.tasks)) != len(req.tasks):
        raise UsageError(f"--tasks lists a task twice: {','.join(req.tasks)}")
    for name in req.tasks + ([req.hold_out] if req.hold_out else []):
        task = registry.task(name).obj()
        task.preset(req.preset)
        if req.eval_preset:
            task.preset(req.eval_preset)
        if "lr" not in task.hparam_space():
            raise UsageError(f"task {name} has no 'lr' hyperparameter for the policy to control")
    if req.hold_out and req.hold_out in req.tasks:
        raise UsageError(f"--hold-out {req.hold_out} is also a training task")
    if req.timesteps < 1:
        raise UsageError(f"--timesteps must be at least 1, got {req.timesteps}")
    if req.horizon < 1:
        raise UsageError(f"--horizon must be at least 1, got {req.horizon}")
    if req.interval is not None and req.interval < 1:
        raise UsageError(f"--interval must be at least 1, got {req.interval}")
    if req.eval_seeds < 0:
        raise UsageError(f"--eval-seeds must be >= 0, got {req.eval_seeds}")
    if req.data_dir and not Path(req.data_dir).is_dir():
        raise UsageError(f"data directory {req.data_dir} does not exist")
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")


def _rollout_length(timesteps: int, n_envs: int, horizon: int) -> int:
    """Steps per environment per PPO update: whole episodes, at least 4 updates when the budget allows, at most 128."""
    per_env = max(1, timesteps // n_envs)
    episodes = max(1, min(per_env // (4 * horizon), max(1, 128 // horizon)))
    return max(2, episodes * horizon)


def meta_train(req: MetaTrainRequest, tracker: Any = None, progress: bool = True) -> dict[str, Any]:
    """Train, save, evaluate; return the policy spec (also written to ``OUT/NAME.json``)."""
    import torch
    import torch.nn as nn
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor, VecNormalize

    from metacore.app.runner import git_commit
    from metacore.controllers.ppo.env import HyperparamControlEnv
    from metacore.controllers.ppo.policy import save_policy, update_spec
    from metacore.core.tracking import MlflowTracker

    validate(req)
    tracker = tracker or MlflowTracker(req.tracking_uri)
    n_envs = len(req.tasks)
    data_dir = req.data_dir

    def make(i: int, name: str):
        return lambda: HyperparamControlEnv(task=name, preset=req.preset, interval=req.interval, horizon=req.horizon,
                                            seed=req.seed + 1000 * i, data_dir=data_dir, lr_spread=req.lr_spread)

    venv = VecNormalize(VecMonitor(DummyVecEnv([make(i, t) for i, t in enumerate(req.tasks)])),
                        norm_obs=True, norm_reward=True, clip_obs=10.0, gamma=PPO_DEFAULTS["gamma"])
    venv.seed(req.seed)
    n_steps = _rollout_length(req.timesteps, n_envs, req.horizon)
    batch = n_steps * n_envs
    minibatch = max(2, min(64, batch))
    while batch % minibatch:
        minibatch -= 1
    ppo_params = {**PPO_DEFAULTS, "n_steps": n_steps, "batch_size": minibatch, "n_envs": n_envs}
    model = PPO("MlpPolicy", venv, n_steps=n_steps, batch_size=minibatch, n_epochs=PPO_DEFAULTS["n_epochs"],
                learning_rate=PPO_DEFAULTS["learning_rate"], gamma=PPO_DEFAULTS["gamma"],
                gae_lambda=PPO_DEFAULTS["gae_lambda"], clip_range=PPO_DEFAULTS["clip_range"],
                ent_coef=PPO_DEFAULTS["ent_coef"], seed=req.seed, device="cpu", verbose=0,
                policy_kwargs={"net_arch": {"pi": PPO_DEFAULTS["hidden"], "vf": PPO_DEFAULTS["hidden"]},
                               "activation_fn": nn.Tanh})
    envs: list[HyperparamControlEnv] = [e for e in venv.venv.venv.envs]  # type: ignore[attr-defined]
    intervals = {t: e.interval_for(t) for t, e in zip(req.tasks, envs, strict=True)}
    run_id = tracker.start_run(
        req.experiment, f"meta-train {','.join(req.tasks)}" + (f" (hold out {req.hold_out})" if req.hold_out else ""),
        tags={"metacore.role": "meta-train", "metacore.controller": "ppo", "metacore.task": ",".join(req.tasks)},
        params={"tasks": ",".join(req.tasks), "hold_out": req.hold_out or "none", "preset": req.preset,
                "timesteps": req.timesteps, "horizon": req.horizon, "intervals": intervals, "seed": req.seed,
                "lr_spread": req.lr_spread, "features": ",".join(FEATURES), "git.commit": git_commit(),
                **{f"ppo.{k}": v for k, v in ppo_params.items()}})
    callback = _Curves(tracker, run_id, req.timesteps, progress)
    start = time.perf_counter()
    status = "FAILED"
    try:
        model.learn(total_timesteps=req.timesteps, callback=callback)
        status = "FINISHED"
    finally:
        callback.close()
        if status != "FINISHED":
            tracker.end_run(run_id, status)
    wall = time.perf_counter() - start
    timesteps_done = int(model.num_timesteps)
    inner = sum(callback.inner_steps.values())
    run_equiv = sum(callback.inner_steps[t] / max(1, e.presets[t].steps) for t, e in zip(req.tasks, envs,
                                                                                          strict=True))
    actor = extract_actor(model.policy)
    rms = venv.obs_rms
    spec = {
        "observation": {"features": list(FEATURES), "mean": [float(x) for x in rms.mean],
                        "var": [float(x) for x in rms.var], "clip": float(venv.clip_obs),
                        "epsilon": float(venv.epsilon)},
        "action": {"hparams": list(envs[0].hparam_names), "max_log_step": envs[0].max_log_step, "low": -1.0,
                   "high": 1.0, "meaning": "hparam *= exp(action * max_log_step) every interval steps"},
        "network": {"hidden": list(PPO_DEFAULTS["hidden"]), "activation": "tanh",
                    "library": "stable-baselines3 MlpPolicy actor (deterministic action = mean, clipped)"},
        "decisions": {"horizon": req.horizon, "intervals": intervals},
        "training": {"command": req.command, "commit": git_commit(), "tasks": list(req.tasks),
                     "hold_out": req.hold_out, "preset": req.preset, "timesteps": timesteps_done,
                     "inner_steps": inner, "run_equivalents": round(run_equiv, 2),
                     "episodes": sum(callback.episodes.values()), "wall_s": round(wall, 1), "seed": req.seed,
                     "lr_spread": req.lr_spread, "ppo": ppo_params, "mlflow_run_id": run_id,
                     "data": "real data: " + ", ".join(
                         f"{t} ({e.presets[t].description or req.preset})" for t, e in zip(req.tasks, envs,
                                                                                          strict=True)),
                     "versions": {"torch": torch.__version__, "stable_baselines3": _version("stable_baselines3"),
                                  "gymnasium": _version("gymnasium")}},
        "evaluation": None,
    }
    with torch.no_grad():
        sd = {k: v.clone() for k, v in actor.state_dict().items()}
    json_path, _ = save_policy(req.out, sd, spec, name=req.name)
    venv.close()
    evaluation = None
    if req.hold_out and req.eval_seeds:
        evaluation = evaluate_held_out(req, json_path, tracker)
        update_spec(json_path, evaluation=evaluation)
        spec["evaluation"] = evaluation
        for c, r in evaluation["controllers"].items():
            tracker.log_metrics(run_id, {f"heldout/{c}/{k}": v for k, v in r.items() if isinstance(v, float)},
                                timesteps_done)
    tracker.log_dict(run_id, {**spec, "policy_file": str(json_path)}, "policy.json")
    tracker.end_run(run_id, "FINISHED")
    spec["policy_file"] = str(json_path)
    return spec


def extract_actor(policy: Any):
    """The deterministic actor of a stable-baselines3 ``ActorCriticPolicy`` (MLP features) as ``nn.Sequential``.

    Its layout is the one :func:`metacore.controllers.ppo.policy.build_actor` rebuilds from the JSON spec.
    """
    import torch.nn as nn

    return nn.Sequential(*list(policy.mlp_extractor.policy_net), policy.action_net)


def evaluate_held_out(req: MetaTrainRequest, policy_json: Path, tracker: Any) -> dict[str, Any]:
    """The new policy on the held-out task vs the other controllers, same seeds and budget (``metacore run``)."""
    from metacore.app.runner import RunRequest, execute, plan_run
    from metacore.core.registry import load_registry

    registry = load_registry()
    preset = req.eval_preset or req.preset
    controllers = [("ppo", {"policy": str(policy_json)})]
    controllers += [(c, {}) for c in req.eval_controllers if c in registry.controllers and c != "ppo"]
    runs: dict[str, list[dict[str, Any]]] = {}
    primary = registry.task(req.hold_out).obj().primary_metric
    for name, sets in controllers:
        plan = plan_run(RunRequest(task=req.hold_out, controller=name, baseline=None, preset=preset, seed=0,
                                   seeds=req.eval_seeds, controller_sets=sets, data_dir=req.data_dir,
                                   tracking_uri=req.tracking_uri), registry)
        summary = execute(plan, tracker=tracker)
        runs[name] = summary["runs"]
    out: dict[str, Any] = {"task": req.hold_out, "preset": preset, "seeds": req.eval_seeds, "metric": primary,
                           "controllers": {}}
    for name, rs in runs.items():
        out["controllers"][name] = _stats(rs, primary)
    return out


def _stats(runs: list[dict[str, Any]], primary: str) -> dict[str, Any]:
    def col(key: str) -> list[float]:
        return [r["final"].get(key, math.nan) for r in runs]

    from metacore.analysis.stats import summarize

    res: dict[str, Any] = {"diverged": sum(bool(r["diverged"]) for r in runs)}
    for split in ("val", "test"):
        vals = col(f"{split}/{primary}")
        stat = summarize(vals)  # mean and sample std over the finite values, as in every other table
        if stat.n:
            res[f"{split}_mean"] = stat.mean
            res[f"{split}_std"] = stat.std if stat.std is not None else 0.0  # one seed: no spread
        res[f"{split}_per_seed"] = vals
    res["wall_s"] = round(sum(r["wall_s"] for r in runs), 1)
    return res


def _version(module: str) -> str:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", "unknown")


def _make_callback_base():
    from stable_baselines3.common.callbacks import BaseCallback

    return BaseCallback


class _Curves:
    """Wrapped in :func:`_Curves.__new__` into a stable-baselines3 callback: progress bar and MLflow curves."""

    def __new__(cls, tracker: Any, run_id: str, total: int, progress: bool):
        base = _make_callback_base()

        class Curves(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.tracker, self.run_id, self.total = tracker, run_id, total
                self.returns: dict[str, list[float]] = {}
                self.scores: dict[str, list[float]] = {}
                self.episodes: dict[str, int] = {}
                self.inner_steps: dict[str, int] = {}
                self.ep_return: list[float] = []
                self.bar = None
                self.reported = 0
                self.started = time.perf_counter()
                if progress:
                    from metacore.app.progress import RunProgress

                    self.bar = RunProgress(unit="decisions")
                    self.bar_update = self.bar.start("meta-train", total)

            def _on_step(self) -> bool:
                infos, dones = self.locals.get("infos", []), self.locals.get("dones", [])
                rewards = self.locals.get("rewards")
                if not self.ep_return:
                    self.ep_return = [0.0] * len(infos)
                for i, info in enumerate(infos):
                    task = info.get("task", "?")
                    self.inner_steps[task] = self.inner_steps.get(task, 0) + int(info.get("interval", 0))
                    if bool(dones[i]):
                        ep = info.get("episode", {})
                        self.returns.setdefault(task, []).append(float(ep.get("r", 0.0)))
                        self.scores.setdefault(task, []).append(float(info.get("score", 0.0)))
                        self.episodes[task] = self.episodes.get(task, 0) + 1
                del rewards
                if self.bar is not None:
                    self.bar_update(min(self.num_timesteps, self.total))
                    tenth = 10 * self.num_timesteps // max(1, self.total)
                    if not self.bar.is_terminal and tenth > self.reported:  # a log file: a line per 10%
                        self.reported = tenth
                        print(f"meta-train: {self.num_timesteps}/{self.total} decisions, "
                              f"{time.perf_counter() - self.started:.0f} s", file=sys.stderr, flush=True)
                return True

            def _on_rollout_end(self) -> None:
                metrics: dict[str, float] = {}
                all_r = []
                for task, rs in self.returns.items():
                    recent = rs[-10:]
                    all_r += recent
                    metrics[f"meta/return/{task}"] = sum(recent) / len(recent)
                    sc = self.scores[task][-10:]
                    metrics[f"meta/score/{task}"] = sum(sc) / len(sc)
                    metrics[f"meta/episodes/{task}"] = float(self.episodes[task])
                if all_r:
                    metrics["meta/return"] = sum(all_r) / len(all_r)
                for k, v in self.model.logger.name_to_value.items():
                    if k.startswith("train/") and isinstance(v, (int, float)) and math.isfinite(v):
                        metrics[f"ppo/{k[len('train/'):]}"] = float(v)
                if metrics:
                    self.tracker.log_metrics(self.run_id, metrics, self.num_timesteps)

            def close(self) -> None:
                if self.bar is not None:
                    self.bar_update(min(self.num_timesteps, self.total))
                    self.bar.stop()
                    self.bar = None
                self.tracker.flush(self.run_id)

        return Curves()
