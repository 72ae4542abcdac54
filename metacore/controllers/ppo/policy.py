"""The meta-policy file format: actor weights as safetensors plus a JSON spec. No pickle anywhere on the load path.

A policy is two files side by side, ``NAME.safetensors`` and ``NAME.json``. The JSON says what the network is
(observation features, normalisation statistics, action meaning, layer sizes), how it was made (command, commit, tasks,
timesteps, wall time) and how it did (held-out evaluation). It also records the SHA-256 of the weights file and a
random ``policy_id`` that the safetensors metadata repeats, so a tampered weights file, a weights file from another
policy, a JSON that no longer matches the tensors, or features this version does not compute are each a clear
:class:`PolicyError` instead of a silently wrong controller.

Inference needs only torch: the actor is rebuilt as a plain ``nn.Sequential`` (the stable-baselines3 ``MlpPolicy``
actor: hidden layers with tanh, then the action mean), so running the ``ppo`` controller never imports
stable-baselines3.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from metacore.controllers.ppo.features import FEATURES
from metacore.controllers.ppo.residual import TEACHER_FEATURE
from metacore.core.checkpoint import sha256_file
from metacore.core.errors import MetacoreError

FORMAT = "metacore-ppo-policy"
FORMAT_VERSION = 1
POLICY_DIR = Path(__file__).parent / "policies"
ACTIVATIONS = ("tanh", "relu")


class PolicyError(MetacoreError):
    """A policy file is missing, tampered with, or does not match this version of metacore."""


def default_policy_path() -> Path:
    return POLICY_DIR / "default.json"


def resolve_policy_path(path: str | Path | None) -> Path:
    """``default`` or empty: the shipped policy; a folder: its ``policy.json``; ``X.safetensors`` -> ``X.json``."""
    if path is None or str(path) in ("", "default"):
        return default_policy_path()
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "policy.json"
    elif p.suffix != ".json":  # X.safetensors or a stem
        p = p.with_suffix(".json")
    return p


def _require(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise PolicyError(f"policy {where}: {what}")


def read_spec(path: str | Path | None) -> tuple[Path, dict[str, Any], Path]:
    """Read and check the JSON spec and the weights file's checksum (no torch needed); return the paths and spec."""
    json_path = resolve_policy_path(path)
    if not json_path.is_file():
        raise PolicyError(f"policy file {json_path} not found (pass --controller-set policy=PATH to a policy .json, "
                          f"its .safetensors, or the folder meta-train wrote)")
    try:
        spec = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(f"policy {json_path} is not valid JSON ({exc})") from None
    _require(isinstance(spec, dict) and spec.get("format") == FORMAT, json_path, f"not a {FORMAT} file")
    _require(spec.get("format_version") == FORMAT_VERSION, json_path,
             f"format version {spec.get('format_version')!r}, this metacore reads {FORMAT_VERSION}")
    obs, act, net = spec.get("observation"), spec.get("action"), spec.get("network")
    _require(all(isinstance(x, dict) for x in (obs, act, net)), json_path, "observation/action/network missing")
    teacher = spec.get("teacher")
    _require(teacher is None or (isinstance(teacher, dict) and isinstance(teacher.get("name"), str)
                                 and isinstance(teacher.get("options", {}), dict)), json_path,
             "teacher must be {\"name\": a controller, \"options\": {...}} or absent")
    expected = observation_features(teacher is not None)
    feats = obs.get("features")
    _require(feats == expected, json_path,
             f"expects observation features {feats}, this metacore computes {expected}")
    n = len(expected)
    for key in ("mean", "var"):
        vals = obs.get(key)
        _require(isinstance(vals, list) and len(vals) == n and all(_finite(v) for v in vals), json_path,
                 f"observation.{key} must be {n} finite numbers")
    _require(all(v >= 0 for v in obs["var"]), json_path, "observation.var must be non-negative")
    _require(_finite(obs.get("clip")) and obs["clip"] > 0, json_path, "observation.clip must be positive")
    names = act.get("hparams")
    _require(isinstance(names, list) and bool(names) and all(isinstance(h, str) for h in names), json_path,
             "action.hparams must be a non-empty list of names")
    _require(_finite(act.get("max_log_step")) and 0 < act["max_log_step"] <= 5, json_path,
             "action.max_log_step must lie in (0, 5]")
    hidden = net.get("hidden")
    _require(isinstance(hidden, list) and all(isinstance(h, int) and 0 < h <= 4096 for h in hidden), json_path,
             "network.hidden must be a list of layer sizes")
    _require(net.get("activation") in ACTIVATIONS, json_path, f"network.activation must be one of {ACTIVATIONS}")
    horizon = spec.get("decisions", {}).get("horizon")
    _require(isinstance(horizon, int) and horizon >= 1, json_path, "decisions.horizon must be a positive integer")
    weights = json_path.parent / str(spec.get("weights_file", ""))
    _require(bool(spec.get("weights_file")) and weights.is_file() and weights.parent == json_path.parent, json_path,
             f"weights file {weights} not found")
    _require(sha256_file(weights) == spec.get("weights_sha256"), json_path,
             f"weights file {weights.name} does not match the checksum in the JSON (tampered or from another policy)")
    return json_path, spec, weights


def observation_features(teacher: bool) -> list[str]:
    """The observation a policy reads: the task-agnostic features, and its residual when it has a teacher."""
    return list(FEATURES) + ([TEACHER_FEATURE] if teacher else [])


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_actor(n_obs: int, n_act: int, hidden: list[int], activation: str):
    import torch.nn as nn

    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[Any] = []
    width = n_obs
    for h in hidden:
        layers += [nn.Linear(width, h), act()]
        width = h
    layers.append(nn.Linear(width, n_act))
    return nn.Sequential(*layers)


@dataclass
class Policy:
    """A loaded policy: normalise the observation, run the actor, clip the action to [-1, 1]. Deterministic."""

    path: Path
    spec: dict[str, Any]
    actor: Any
    mean: Any
    std: Any
    clip: float

    @property
    def hparams(self) -> list[str]:
        return list(self.spec["action"]["hparams"])

    @property
    def max_log_step(self) -> float:
        return float(self.spec["action"]["max_log_step"])

    @property
    def teacher(self) -> dict[str, Any] | None:
        """``{"name", "options"}`` of the rule the policy's actions correct (a residual policy), or None."""
        return self.spec.get("teacher")

    @property
    def horizon(self) -> int:
        return int(self.spec["decisions"]["horizon"])

    def act(self, features: list[float]) -> list[float]:
        import torch

        with torch.no_grad():
            x = torch.tensor(features, dtype=torch.float32)
            x = ((x - self.mean) / self.std).clamp(-self.clip, self.clip)
            return self.actor(x).clamp(-1.0, 1.0).tolist()


def load_policy(path: str | Path | None = None) -> Policy:
    """Load and verify a policy (see the module docstring for what is checked)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    json_path, spec, weights = read_spec(path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PolicyError(f"policy weights {weights} cannot be read as safetensors ({exc})") from None
    _require(meta.get("policy_id") == spec.get("policy_id"), json_path,
             "the weights file belongs to another policy (policy_id mismatch)")
    n_obs, n_act = len(spec["observation"]["features"]), len(spec["action"]["hparams"])
    actor = build_actor(n_obs, n_act, spec["network"]["hidden"], spec["network"]["activation"])
    expected = {k: tuple(v.shape) for k, v in actor.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    _require(expected == found, json_path, f"weights do not match the declared network (expected {expected}, "
             f"found {found})")
    _require(all(bool(torch.isfinite(v).all()) for v in tensors.values()), json_path, "weights are not finite")
    actor.load_state_dict({k: v.float() for k, v in tensors.items()})
    actor.eval()
    obs = spec["observation"]
    mean = torch.tensor(obs["mean"], dtype=torch.float32)
    std = torch.tensor([math.sqrt(v + obs.get("epsilon", 1e-8)) for v in obs["var"]], dtype=torch.float32)
    return Policy(json_path, spec, actor, mean, std, float(obs["clip"]))


def save_policy(out_dir: str | Path, actor_state: Mapping[str, Any], spec: dict[str, Any], name: str = "policy"
                ) -> tuple[Path, Path]:
    """Write ``NAME.safetensors`` and ``NAME.json`` (checksum and policy id filled in); return both paths."""
    import uuid

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    json_path = out / f"{name}.json"
    spec = dict(spec)
    spec.update(format=FORMAT, format_version=FORMAT_VERSION, weights_file=weights.name,
                policy_id=uuid.uuid4().hex)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in actor_state.items()}, str(weights),
              metadata={"format": FORMAT, "policy_id": spec["policy_id"]})
    spec["weights_sha256"] = sha256_file(weights)
    json_path.write_text(json.dumps(spec, indent=2) + "\n")
    return json_path, weights


def update_spec(json_path: str | Path, **fields: Any) -> None:
    """Add fields (e.g. the evaluation results) to a written policy's JSON; the weights are untouched."""
    p = Path(json_path)
    spec = json.loads(p.read_text())
    spec.update(fields)
    p.write_text(json.dumps(spec, indent=2) + "\n")
