"""Meta-training: stable-baselines3 PPO across tasks, then the policy written as safetensors + JSON.

One environment per training task, vectorised (``DummyVecEnv``: the runs are small and the CPUs are few, so one
process steps them in turn), observations normalised by ``VecNormalize`` (its running mean and variance are saved in
the policy JSON and applied by the controller), and rewards normalised for the value function only.

The meta-training curves (episode return per task, final validation score per task, PPO's losses) are logged to
MLflow in the ``meta-train`` experiment; at the end the new policy runs on the held-out task against ``static`` (and
``hypergrad`` when it is registered) through ``metacore run``'s own runner, and the results go into the policy JSON.

**Starting from a rule** (``teacher``, ``bc_episodes``): with a teacher the policy is a residual over that controller
(:mod:`metacore.controllers.ppo.residual`). Before PPO, ``bc_episodes`` teacher-driven episodes per task (actions 0)
give the warm start: the actor's output layer is fit to the teacher's actions, which are 0 in the residual's action
space at every observation, so the least-squares fit is exact (weights and bias 0: the policy *is* the teacher); the
critic is regressed on the teacher's discounted returns and the observation normaliser has seen the teacher's runs.

**Checkpoints** (``checkpoint_every``): every N PPO updates (and after the warm start, and at the end) the whole
meta-training state goes to ``OUT/checkpoint/`` (:mod:`metacore.app.meta_checkpoint`: safetensors + JSON): policy,
value function and log-std, the Adam state, SB3's counters (timesteps, updates, the last observation and episode
starts, the episode buffer), ``VecNormalize``'s and ``VecMonitor``'s statistics, every environment (its episode draw
and generator and, mid-run, the inner run's trainer checkpoint), the Python, NumPy and torch generators and the
curves so far. :func:`meta_train` with ``resume=True`` continues from the newest one to the same policy as an
uninterrupted run, bit for bit on a CPU (tested).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    teacher: str | None = None  # a residual policy over this controller (autolr, ...); None: none
    teacher_options: dict[str, Any] = field(default_factory=dict)
    bc_episodes: int = 0  # teacher-driven warm-start episodes per training task before PPO
    reward: str = "delta"  # "delta": score change per decision; "final": the run's score gain at its end
    gamma: float = PPO_DEFAULTS["gamma"]
    action_std: float = 1.0  # PPO's initial exploration std of the action (SB3: 1.0)
    checkpoint_every: int = 1  # PPO updates between checkpoints (0: none)

    def as_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


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
    if req.teacher:
        from metacore.controllers.ppo.residual import make_teacher

        make_teacher(req.teacher, req.teacher_options)
    if req.bc_episodes < 0:
        raise UsageError(f"--bc-episodes must be >= 0, got {req.bc_episodes}")
    from metacore.controllers.ppo.env import REWARDS

    if req.reward not in REWARDS:
        raise UsageError(f"--reward must be one of {', '.join(REWARDS)}, got {req.reward!r}")
    if not 0 < req.gamma <= 1:
        raise UsageError(f"--gamma must lie in (0, 1], got {req.gamma}")
    if not req.action_std > 0:
        raise UsageError(f"--action-std must be positive, got {req.action_std}")
    if req.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {req.checkpoint_every}")
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


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoint"


def meta_train(req: MetaTrainRequest, tracker: Any = None, progress: bool = True, *, resume: bool = False
               ) -> dict[str, Any]:
    """Train, save, evaluate; return the policy spec (also written to ``OUT/NAME.json``).

    ``resume``: continue from the newest checkpoint in ``OUT/checkpoint/`` (from the start, with the same MLflow run,
    if the run was killed before its first one)."""
    import numpy as np
    import torch
    import torch.nn as nn
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor, VecNormalize

    from metacore.app import meta_checkpoint
    from metacore.app.runner import git_commit
    from metacore.controllers.ppo.env import HyperparamControlEnv
    from metacore.controllers.ppo.policy import save_policy, update_spec
    from metacore.core.tracking import MlflowTracker

    validate(req)
    tracker = tracker or MlflowTracker(req.tracking_uri)
    n_envs = len(req.tasks)
    data_dir = req.data_dir
    ckpt_dir = checkpoint_dir(req.out)
    state = meta_checkpoint.latest(ckpt_dir) if resume else None

    def make(i: int, name: str):
        return lambda: HyperparamControlEnv(task=name, preset=req.preset, interval=req.interval, horizon=req.horizon,
                                            seed=req.seed + 1000 * i, data_dir=data_dir, lr_spread=req.lr_spread,
                                            teacher=req.teacher, teacher_options=req.teacher_options,
                                            reward=req.reward)

    venv = VecNormalize(VecMonitor(DummyVecEnv([make(i, t) for i, t in enumerate(req.tasks)])),
                        norm_obs=True, norm_reward=True, clip_obs=10.0, gamma=req.gamma)
    venv.seed(req.seed)
    n_steps = _rollout_length(req.timesteps, n_envs, req.horizon)
    batch = n_steps * n_envs
    minibatch = max(2, min(64, batch))
    while batch % minibatch:
        minibatch -= 1
    ppo_params = {**PPO_DEFAULTS, "gamma": req.gamma, "n_steps": n_steps, "batch_size": minibatch,
                  "n_envs": n_envs, "log_std_init": math.log(req.action_std)}
    model = PPO("MlpPolicy", venv, n_steps=n_steps, batch_size=minibatch, n_epochs=PPO_DEFAULTS["n_epochs"],
                learning_rate=PPO_DEFAULTS["learning_rate"], gamma=req.gamma,
                gae_lambda=PPO_DEFAULTS["gae_lambda"], clip_range=PPO_DEFAULTS["clip_range"],
                ent_coef=PPO_DEFAULTS["ent_coef"], seed=req.seed, device="cpu", verbose=0,
                policy_kwargs={"net_arch": {"pi": PPO_DEFAULTS["hidden"], "vf": PPO_DEFAULTS["hidden"]},
                               "activation_fn": nn.Tanh, "log_std_init": math.log(req.action_std)})
    envs: list[HyperparamControlEnv] = [e for e in venv.venv.venv.envs]  # type: ignore[attr-defined]
    intervals = {t: e.interval_for(t) for t, e in zip(req.tasks, envs, strict=True)}
    features = list(envs[0].features)
    if resume:
        saved = meta_checkpoint.read_request(ckpt_dir) if (ckpt_dir / meta_checkpoint.REQUEST).is_file() else {}
        run_id = saved.get("mlflow_run_id") or ""
        if not run_id or tracker.get_run(run_id) is None:
            raise UsageError(f"--resume: the meta-train run of {ckpt_dir} is not in the MLflow store "
                             f"{req.tracking_uri or 'sqlite:///mlflow_runs/mlflow.db'}")
        tracker.reopen(run_id)
        log_floor = tracker.last_logged_step(run_id)
    else:
        run_id = tracker.start_run(
            req.experiment, f"meta-train {','.join(req.tasks)}" + (f" (hold out {req.hold_out})" if req.hold_out
                                                                   else ""),
            tags={"metacore.role": "meta-train", "metacore.controller": "ppo", "metacore.task": ",".join(req.tasks),
                  "metacore.checkpoint_dir": str(ckpt_dir.resolve())},
            params={"tasks": ",".join(req.tasks), "hold_out": req.hold_out or "none", "preset": req.preset,
                    "timesteps": req.timesteps, "horizon": req.horizon, "intervals": intervals, "seed": req.seed,
                    "lr_spread": req.lr_spread, "features": ",".join(features), "git.commit": git_commit(),
                    "teacher": req.teacher or "none", "bc_episodes": req.bc_episodes, "reward": req.reward,
                    **{f"ppo.{k}": v for k, v in ppo_params.items()}})
        log_floor = -1
        meta_checkpoint.write_request(ckpt_dir, {**req.as_dict(), "out": str(Path(req.out).resolve()),
                                                  "mlflow_run_id": run_id})
    callback = _Curves(tracker, run_id, req.timesteps, progress, log_floor=log_floor)
    start = time.perf_counter()
    status = "FAILED"
    bc: dict[str, Any] = {}
    wall_before = 0.0

    def save(updates: int) -> None:
        meta_checkpoint.save(ckpt_dir, updates, capture(model, venv, envs, callback, {
            "bc": bc, "bc_done": True, "wall_s": wall_before + time.perf_counter() - start}))

    try:
        if state is None:
            obs = venv.reset()
            if req.bc_episodes:
                bc = warm_start(model, venv, envs, req)
                tracker.log_metrics(run_id, {f"bc/{k}": float(v) for k, v in bc.items()
                                             if isinstance(v, (int, float))}, 0)
                obs = venv.reset()
            model._last_obs = obs
            model._last_episode_starts = np.ones((venv.num_envs,), dtype=bool)
            if req.checkpoint_every:
                save(0)
        else:
            updates, saved_state = state
            restore(model, venv, envs, callback, saved_state)
            bc, wall_before = dict(saved_state.get("bc") or {}), float(saved_state.get("wall_s", 0.0))
            callback.updates_saved = updates
        callback.every = req.checkpoint_every
        callback.save = save
        callback.n_epochs = PPO_DEFAULTS["n_epochs"]
        remaining = req.timesteps - int(model.num_timesteps)
        if remaining > 0:
            model.learn(total_timesteps=remaining, callback=callback, reset_num_timesteps=False)
            if req.checkpoint_every:
                save(model._n_updates // PPO_DEFAULTS["n_epochs"])
        status = "FINISHED"
    finally:
        callback.close()
        if status != "FINISHED":
            tracker.end_run(run_id, status)
    wall = wall_before + time.perf_counter() - start
    timesteps_done = int(model.num_timesteps)
    bc_steps = dict(bc.get("inner_steps_per_task") or {})
    inner = sum(callback.inner_steps.values()) + sum(bc_steps.values())
    run_equiv = sum((callback.inner_steps.get(t, 0) + bc_steps.get(t, 0)) / max(1, e.presets[t].steps)
                    for t, e in zip(req.tasks, envs, strict=True))
    actor = extract_actor(model.policy)
    rms = venv.obs_rms
    spec = {
        "observation": {"features": features, "mean": [float(x) for x in rms.mean],
                        "var": [float(x) for x in rms.var], "clip": float(venv.clip_obs),
                        "epsilon": float(venv.epsilon)},
        "action": {"hparams": list(envs[0].hparam_names), "max_log_step": envs[0].max_log_step, "low": -1.0,
                   "high": 1.0, "meaning": ("residual of hparam over the teacher's += action * max_log_step every "
                                            "interval steps; hparam = teacher's * exp(residual)") if req.teacher
                   else "hparam *= exp(action * max_log_step) every interval steps"},
        "network": {"hidden": list(PPO_DEFAULTS["hidden"]), "activation": "tanh",
                    "library": "stable-baselines3 MlpPolicy actor (deterministic action = mean, clipped)"},
        "decisions": {"horizon": req.horizon, "intervals": intervals},
        "training": {"command": req.command, "commit": git_commit(), "tasks": list(req.tasks),
                     "hold_out": req.hold_out, "preset": req.preset, "timesteps": timesteps_done,
                     "inner_steps": inner, "run_equivalents": round(run_equiv, 2),
                     "episodes": sum(callback.episodes.values()), "wall_s": round(wall, 1), "seed": req.seed,
                     "lr_spread": req.lr_spread, "reward": req.reward, "teacher": req.teacher,
                     "bc": bc or None, "ppo": ppo_params, "mlflow_run_id": run_id,
                     "data": "real data: " + ", ".join(
                         f"{t} ({e.presets[t].description or req.preset})" for t, e in zip(req.tasks, envs,
                                                                                          strict=True)),
                     "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
                     "data_sha256sums": _data_manifest(data_dir),
                     "resumed": bool(resume),
                     "versions": {"torch": torch.__version__, "stable_baselines3": _version("stable_baselines3"),
                                  "gymnasium": _version("gymnasium")}},
        "evaluation": None,
    }
    if req.teacher:
        spec["teacher"] = {"name": req.teacher, "options": dict(req.teacher_options)}
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


def _data_manifest(data_dir: str | None) -> str | None:
    """The SHA-256 of the data folder's ``SHA256SUMS`` (which lists every data file's checksum), if it has one."""
    if not data_dir:
        return None
    from metacore.core.checkpoint import sha256_file

    sums = Path(data_dir) / "SHA256SUMS"
    return sha256_file(sums) if sums.is_file() else None


# ---------------------------------------------------------------------------------------------------- warm start
BC_FIT_STEPS = 300  # full-batch Adam steps of the critic's regression on the teacher's returns
BC_FIT_LR = 1e-3


def warm_start(model: Any, venv: Any, envs: list[Any], req: MetaTrainRequest) -> dict[str, Any]:
    """Roll out the teacher (actions 0) for ``req.bc_episodes`` episodes per environment through the normalising
    wrapper, then: the actor's output layer to the teacher's actions (0: exact), the critic to the discounted
    (normalised) returns. Returns what it did (transitions, inner steps per task, value loss before and after)."""
    import numpy as np
    import torch

    n_envs = venv.num_envs
    zero = np.zeros((n_envs, len(envs[0].hparam_names)), dtype=np.float32)
    raw_obs, raw_rew, dones = [], [], []
    inner: dict[str, int] = {}
    episodes = 0
    for _ in range(req.bc_episodes * req.horizon):
        raw_obs.append(venv.get_original_obs().copy())
        _, _, done, infos = venv.step(zero)
        raw_rew.append(venv.get_original_reward().copy())
        dones.append(done.copy())
        episodes += int(done.sum())
        for info in infos:
            inner[info.get("task", "?")] = inner.get(info.get("task", "?"), 0) + int(info.get("interval", 0))
    obs = np.stack(raw_obs)  # (T, n_envs, n_obs)
    rew = venv.normalize_reward(np.stack(raw_rew))  # the scale PPO's value function learns on
    done = np.stack(dones)
    returns = np.zeros_like(rew)
    valid = np.zeros_like(done)  # a transition whose episode ended inside the warm start
    acc, seen_end = np.zeros(n_envs), np.zeros(n_envs, dtype=bool)
    for t in reversed(range(len(rew))):
        seen_end |= done[t]
        acc = rew[t] + req.gamma * acc * (1.0 - done[t])
        returns[t], valid[t] = acc, seen_end
    x = torch.as_tensor(venv.normalize_obs(obs[valid]), dtype=torch.float32)
    y = torch.as_tensor(returns[valid], dtype=torch.float32)
    policy = model.policy
    with torch.no_grad():
        policy.action_net.weight.zero_()  # the teacher's action, 0, at every observation: the exact fit
        policy.action_net.bias.zero_()
    params = list(policy.mlp_extractor.value_net.parameters()) + list(policy.value_net.parameters())
    opt = torch.optim.Adam(params, lr=BC_FIT_LR)

    def value_loss() -> torch.Tensor:
        return ((policy.predict_values(x).flatten() - y) ** 2).mean()

    with torch.no_grad():
        before = float(value_loss()) if len(y) else math.nan
    for _ in range(BC_FIT_STEPS if len(y) else 0):
        opt.zero_grad()
        loss = value_loss()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(value_loss()) if len(y) else math.nan
    return {"episodes": episodes, "transitions": int(valid.sum()), "inner_steps_per_task": inner,
            "value_loss_before": before, "value_loss_after": after, "fit_steps": BC_FIT_STEPS}


# ---------------------------------------------------------------------------------------------------- checkpoints
def capture(model: Any, venv: Any, envs: list[Any], callback: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Everything :func:`restore` needs, between two PPO updates (see the module docstring)."""
    from metacore.core.rng import capture_rng

    monitor = venv.venv
    return {
        "num_timesteps": int(model.num_timesteps), "n_updates": int(model._n_updates),
        "policy": dict(model.policy.state_dict()), "optimizer": model.policy.optimizer.state_dict(),
        "last_obs": model._last_obs, "last_episode_starts": model._last_episode_starts,
        "ep_info_buffer": [dict(x) for x in (model.ep_info_buffer or [])],
        "obs_rms": {"mean": venv.obs_rms.mean, "var": venv.obs_rms.var, "count": float(venv.obs_rms.count)},
        "ret_rms": {"mean": venv.ret_rms.mean, "var": venv.ret_rms.var, "count": float(venv.ret_rms.count)},
        "returns": venv.returns, "old_obs": getattr(venv, "old_obs", None),
        "monitor": {"episode_returns": monitor.episode_returns, "episode_lengths": monitor.episode_lengths,
                    "episode_count": int(monitor.episode_count)},
        "envs": [e.snapshot() for e in envs],
        "callback": callback.state_dict(),
        "rng": capture_rng(),  # last: the environments' snapshots above draw nothing, but keep the order obvious
        **extra,
    }


def restore(model: Any, venv: Any, envs: list[Any], callback: Any, state: dict[str, Any]) -> None:
    """Put a freshly built model and environment back to a :func:`capture`."""
    from collections import deque

    import numpy as np

    from metacore.core.rng import restore_rng

    for env, snap in zip(envs, state["envs"], strict=True):
        env.restore(snap)
    model.policy.load_state_dict(state["policy"])
    model.policy.optimizer.load_state_dict(state["optimizer"])
    model.num_timesteps = int(state["num_timesteps"])
    model._n_updates = int(state["n_updates"])
    model._last_obs = np.asarray(state["last_obs"])
    model._last_episode_starts = np.asarray(state["last_episode_starts"])
    model.ep_info_buffer = deque(state["ep_info_buffer"], maxlen=model._stats_window_size)
    model.ep_success_buffer = deque(maxlen=model._stats_window_size)
    for key in ("obs_rms", "ret_rms"):
        rms = getattr(venv, key)
        rms.mean = np.asarray(state[key]["mean"]).copy()
        rms.var = np.asarray(state[key]["var"]).copy()
        rms.count = float(state[key]["count"])
    venv.returns = np.asarray(state["returns"]).copy()
    if state.get("old_obs") is not None:
        venv.old_obs = np.asarray(state["old_obs"]).copy()
    monitor = venv.venv
    monitor.episode_returns = np.asarray(state["monitor"]["episode_returns"]).copy()
    monitor.episode_lengths = np.asarray(state["monitor"]["episode_lengths"]).copy()
    monitor.episode_count = int(state["monitor"]["episode_count"])
    callback.load_state_dict(state["callback"])
    restore_rng(state["rng"])


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
    """Wrapped in :func:`_Curves.__new__` into a stable-baselines3 callback: progress bar, MLflow curves, and the
    checkpoint every ``every`` updates (``save(updates)``, at the start of a rollout, i.e. right after an update)."""

    def __new__(cls, tracker: Any, run_id: str, total: int, progress: bool, log_floor: int = -1):
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
                self.log_floor = log_floor  # after a resume: steps the store already holds are not logged again
                self.every, self.save, self.n_epochs, self.updates_saved = 0, None, 1, 0
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

            def _on_rollout_start(self) -> None:
                updates = self.model._n_updates // max(1, self.n_epochs)
                if self.every and self.save is not None and updates > self.updates_saved \
                        and updates % self.every == 0:
                    self.save(updates)
                    self.updates_saved = updates

            def state_dict(self) -> dict[str, Any]:
                return {"returns": self.returns, "scores": self.scores, "episodes": self.episodes,
                        "inner_steps": self.inner_steps, "ep_return": self.ep_return, "reported": self.reported}

            def load_state_dict(self, state: dict[str, Any]) -> None:
                self.returns = {k: list(v) for k, v in state["returns"].items()}
                self.scores = {k: list(v) for k, v in state["scores"].items()}
                self.episodes, self.inner_steps = dict(state["episodes"]), dict(state["inner_steps"])
                self.ep_return, self.reported = list(state["ep_return"]), int(state["reported"])

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
                if metrics and self.num_timesteps > self.log_floor:
                    self.tracker.log_metrics(self.run_id, metrics, self.num_timesteps)

            def close(self) -> None:
                if self.bar is not None:
                    self.bar_update(min(self.num_timesteps, self.total))
                    self.bar.stop()
                    self.bar = None
                self.tracker.flush(self.run_id)

        return Curves()
