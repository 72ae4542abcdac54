"""Meta-training: stable-baselines3 PPO across tasks, then the policy written as safetensors + JSON.

One environment per training task, vectorised (``DummyVecEnv``: the runs are small and the CPUs are few, so one
process steps them in turn), observations normalised by ``VecNormalize`` (its running mean and variance are saved in
the policy JSON and applied by the controller), and rewards normalised for the value function only.

The meta-training curves (episode return per task, final validation score per task, PPO's losses) are logged to
MLflow in the ``meta-train`` experiment (:mod:`metacore.app.meta_callback`); at the end the new policy runs on the
held-out task against ``static`` (and ``hypergrad`` when it is registered) through ``metacore run``'s own runner
(:mod:`metacore.app.meta_eval`), and the results go into the policy JSON (:mod:`metacore.app.meta_policy_spec`).

**Starting from a rule** (``teacher``, ``bc_episodes``): with a teacher the policy is a residual over that controller
(:mod:`metacore.controllers.ppo.residual`), warm-started from it before PPO (:mod:`metacore.app.meta_warm_start`).

**Checkpoints** (``checkpoint_every``): every N PPO updates (and after the warm start, and at the end) the whole
meta-training state (:mod:`metacore.app.meta_state`) goes to ``OUT/checkpoint/`` (:mod:`metacore.app.meta_checkpoint`:
safetensors + JSON). :func:`meta_train` with ``resume=True`` continues from the newest one to the same policy as an
uninterrupted run, bit for bit on a CPU (tested).

This module holds the orchestration; the request and its checks are in :mod:`metacore.app.meta_request` (and
re-exported here, with :func:`extract_actor`, for the callers that import them from this module).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from metacore.app.meta_policy_spec import extract_actor
from metacore.app.meta_request import PPO_DEFAULTS, MetaTrainRequest, validate
from metacore.core.errors import UsageError

__all__ = ["PPO_DEFAULTS", "MetaTrainRequest", "checkpoint_dir", "extract_actor", "meta_train", "validate"]


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
    from metacore.app.meta_callback import MetaTrainCallback
    from metacore.app.meta_eval import evaluate_held_out
    from metacore.app.meta_policy_spec import policy_spec
    from metacore.app.meta_state import capture, restore
    from metacore.app.meta_warm_start import warm_start
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
    # against the teacher's run the advantage's sign is the measured gain over the rule: kept, not normalised away,
    # so deviations that all lost push the policy back towards the teacher instead of towards the lesser loser
    normalize_advantage = req.reward != "teacher"
    ppo_params = {**PPO_DEFAULTS, "gamma": req.gamma, "n_steps": n_steps, "batch_size": minibatch,
                  "n_envs": n_envs, "log_std_init": math.log(req.action_std),
                  "normalize_advantage": normalize_advantage}
    model = PPO("MlpPolicy", venv, n_steps=n_steps, batch_size=minibatch, n_epochs=PPO_DEFAULTS["n_epochs"],
                learning_rate=PPO_DEFAULTS["learning_rate"], gamma=req.gamma,
                gae_lambda=PPO_DEFAULTS["gae_lambda"], clip_range=PPO_DEFAULTS["clip_range"],
                ent_coef=PPO_DEFAULTS["ent_coef"], normalize_advantage=normalize_advantage, seed=req.seed,
                device="cpu", verbose=0,
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
        commit = saved.get("commit") or git_commit()
    else:
        commit = git_commit()
        run_id = tracker.start_run(
            req.experiment, f"meta-train {','.join(req.tasks)}" + (f" (hold out {req.hold_out})" if req.hold_out
                                                                   else ""),
            tags={"metacore.role": "meta-train", "metacore.controller": "ppo", "metacore.task": ",".join(req.tasks),
                  "metacore.checkpoint_dir": str(ckpt_dir.resolve())},
            params={"tasks": ",".join(req.tasks), "hold_out": req.hold_out or "none", "preset": req.preset,
                    "timesteps": req.timesteps, "horizon": req.horizon, "intervals": intervals, "seed": req.seed,
                    "lr_spread": req.lr_spread, "features": ",".join(features), "git.commit": commit,
                    "teacher": req.teacher or "none", "bc_episodes": req.bc_episodes, "reward": req.reward,
                    **{f"ppo.{k}": v for k, v in ppo_params.items()}})
        log_floor = -1
        meta_checkpoint.write_request(ckpt_dir, {**req.as_dict(), "out": str(Path(req.out).resolve()),
                                                  "mlflow_run_id": run_id, "commit": commit})
    callback = MetaTrainCallback(tracker, run_id, req.timesteps, progress, log_floor=log_floor)
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
    spec = policy_spec(req, model, venv, envs, callback, features=features, intervals=intervals,
                       ppo_params=ppo_params, run_id=run_id, bc=bc, wall=wall, resumed=resume, commit=commit)
    actor = extract_actor(model.policy)
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
