"""The whole meta-training state as one plain structure (:func:`capture`) and back (:func:`restore`), between two PPO
updates; :mod:`metacore.app.meta_checkpoint` writes it to disk (safetensors + JSON, no pickle).

It holds the policy, value function and log-std, the Adam state, SB3's counters (timesteps, updates, the last
observation and episode starts, the episode buffer), ``VecNormalize``'s and ``VecMonitor``'s statistics, every
environment (its episode draw and generator and, mid-run, the inner run's trainer checkpoint), the Python, NumPy and
torch generators and the callback's curves so far: a resumed run continues to the same policy as an uninterrupted
one, bit for bit on a CPU (tests/test_meta_train_resume.py).
"""

from __future__ import annotations

from typing import Any


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
