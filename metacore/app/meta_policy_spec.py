"""The policy JSON's spec of a meta-trained policy: what the controller needs to run it (the observation features
and their normaliser, the action's meaning, the network), and where it came from and what it cost (the command,
commit, tasks, data and their checksums, the PPO settings, the decisions and inner optimizer steps taken, in run
equivalents, the wall time, the library versions, the MLflow run).

The ``evaluation`` on the held-out task (:mod:`metacore.app.meta_eval`) is filled in after the policy is written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metacore.app.meta_request import MetaTrainRequest


def policy_spec(req: MetaTrainRequest, model: Any, venv: Any, envs: list[Any], callback: Any, *,
                features: list[str], intervals: dict[str, int], ppo_params: dict[str, Any], run_id: str,
                bc: dict[str, Any], wall: float, resumed: bool, commit: str) -> dict[str, Any]:
    """The spec of the policy ``model`` holds after meta-training (``evaluation``: None, for the caller to fill);
    ``commit``: the code's commit when the meta-training started (not when it ended: the tree may move meanwhile)."""
    import torch

    from metacore.app.meta_request import PPO_DEFAULTS
    data_dir = req.data_dir
    timesteps_done = int(model.num_timesteps)
    bc_steps = dict(bc.get("inner_steps_per_task") or {})
    inner = sum(callback.inner_steps.values()) + sum(bc_steps.values())
    run_equiv = sum((callback.inner_steps.get(t, 0) + bc_steps.get(t, 0)) / max(1, e.presets[t].steps)
                    for t, e in zip(req.tasks, envs, strict=True))
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
        "training": {"command": req.command, "commit": commit, "tasks": list(req.tasks),
                     "hold_out": req.hold_out, "preset": req.preset, "timesteps": timesteps_done,
                     "inner_steps": inner, "run_equivalents": round(run_equiv, 2),
                     "episodes": sum(callback.episodes.values()), "wall_s": round(wall, 1), "seed": req.seed,
                     "lr_spread": req.lr_spread, "reward": req.reward, "teacher": req.teacher,
                     "bc": bc or None, "ppo": ppo_params, "mlflow_run_id": run_id,
                     "data": "real data: " + ", ".join(
                         f"{t} ({e.presets[t].description or req.preset})" for t, e in zip(req.tasks, envs,
                                                                                          strict=True)),
                     "data_dir": str(data_dir) if data_dir else None,  # as given (a policy ships; paths stay)
                     "data_sha256sums": _data_manifest(data_dir),
                     "resumed": bool(resumed),
                     "versions": {"torch": torch.__version__, "stable_baselines3": _version("stable_baselines3"),
                                  "gymnasium": _version("gymnasium")}},
        "evaluation": None,
    }
    if req.teacher:
        spec["teacher"] = {"name": req.teacher, "options": dict(req.teacher_options)}
    return spec


def extract_actor(policy: Any):
    """The deterministic actor of a stable-baselines3 ``ActorCriticPolicy`` (MLP features) as ``nn.Sequential``.

    Its layout is the one :func:`metacore.controllers.ppo.policy.build_actor` rebuilds from the JSON spec.
    """
    import torch.nn as nn

    return nn.Sequential(*list(policy.mlp_extractor.policy_net), policy.action_net)


def _data_manifest(data_dir: str | None) -> str | None:
    """The SHA-256 of the data folder's ``SHA256SUMS`` (which lists every data file's checksum), if it has one."""
    if not data_dir:
        return None
    from metacore.core.checkpoint import sha256_file

    sums = Path(data_dir) / "SHA256SUMS"
    return sha256_file(sums) if sums.is_file() else None


def _version(module: str) -> str:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", "unknown")
