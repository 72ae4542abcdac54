"""Meta-training checkpoints: safetensors for the tensors, JSON for the rest, no pickle on the write or the load path.

A checkpoint is ``ckpt-NNNNNN.safetensors`` + ``ckpt-NNNNNN.json`` (``NNNNNN``: PPO updates done) in the checkpoint
folder, beside ``request.json`` (the meta-train request, written when the run starts, so a run killed before its
first checkpoint restarts from scratch with its original options). Any nested structure of dicts, lists, numbers,
strings and tensors is stored by :func:`flatten`: each tensor goes into the safetensors file under its path
(``a/b/0``), the JSON keeps ``{"__tensor__": path}`` in its place; numpy arrays come back as numpy arrays.

The JSON is written last, atomically (a temporary file renamed), and holds the SHA-256 of its safetensors file and a
random ``checkpoint_id`` the safetensors metadata repeats: a JSON present means its tensors were written completely,
and a tensors file that was changed or belongs to another checkpoint is a :class:`CheckpointError` (bad input,
exit 2), never a silently different run. The two newest checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

from metacore.core.checkpoint import sha256_file
from metacore.core.errors import MetacoreError

FORMAT = "metacore-meta-train-checkpoint"
FORMAT_VERSION = 1
REQUEST = "request.json"
KEEP = 2


class CheckpointError(MetacoreError):
    """A meta-training checkpoint is missing, incomplete, tampered with or from another version."""


def flatten(obj: Any, tensors: dict[str, Any], path: str = "") -> Any:
    """``obj`` with every tensor (or numpy array) moved into ``tensors`` under its path; the rest as JSON values."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__numpy__": path}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint keys must be strings or ints at {path or '/'}")
        keys = [(type(k).__name__, str(k)) for k in obj]
        return {"__dict__": [[t, k, flatten(v, tensors, f"{path}/{k}")] for (t, k), v in zip(keys, obj.values(),
                                                                                            strict=True)]}
    if isinstance(obj, (list, tuple)):
        out = [flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": out} if isinstance(obj, tuple) else out
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}")


def unflatten(obj: Any, tensors: Mapping[str, Any]) -> Any:
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__numpy__" in obj:
            return tensors[obj["__numpy__"]].numpy()
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {(int(k) if t == "int" else k): unflatten(v, tensors) for t, k, v in obj["__dict__"]}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    return obj


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def write_request(folder: str | Path, request: Mapping[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / REQUEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "request": dict(request)})


def save(folder: str | Path, updates: int, state: Mapping[str, Any]) -> Path:
    """Write checkpoint ``updates`` (its JSON path is returned); keep the newest :data:`KEEP`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    body = flatten(dict(state), tensors)
    stem = f"ckpt-{updates:06d}"
    weights = folder / f"{stem}.safetensors"
    cid = uuid.uuid4().hex
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "checkpoint_id": cid})
    os.replace(tmp, weights)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "updates": int(updates), "checkpoint_id": cid,
            "tensors_file": weights.name, "tensors_sha256": sha256_file(weights), "state": body}
    json_path = folder / f"{stem}.json"
    _write_json(json_path, meta)
    for old in checkpoints(folder)[:-KEEP]:
        for p in (old, old.with_suffix(".safetensors")):
            p.unlink(missing_ok=True)
    return json_path


def checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoint JSONs in ``folder``, oldest first."""
    return sorted(Path(folder).glob("ckpt-[0-9]*.json"))


def read_request(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / REQUEST
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} holds no meta-train checkpoint ({REQUEST} not found)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("request"), dict):
        raise CheckpointError(f"{path} is not a {FORMAT} request")
    return meta["request"]


def load(json_path: str | Path) -> tuple[int, dict[str, Any]]:
    """Read and verify one checkpoint; return (updates, state)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    json_path = Path(json_path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {json_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {json_path} is not a {FORMAT} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {json_path}: format version {meta.get('format_version')!r}, this "
                              f"metacore reads {FORMAT_VERSION}")
    weights = json_path.parent / str(meta.get("tensors_file", ""))
    if not meta.get("tensors_file") or not weights.is_file():
        raise CheckpointError(f"checkpoint {json_path}: tensors file {weights.name} not found")
    if sha256_file(weights) != meta.get("tensors_sha256"):
        raise CheckpointError(f"checkpoint {json_path}: {weights.name} does not match the checksum in the JSON "
                              "(tampered or from another checkpoint)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            cid = (f.metadata() or {}).get("checkpoint_id")
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {weights} cannot be read as safetensors ({exc})") from None
    if cid != meta.get("checkpoint_id"):
        raise CheckpointError(f"checkpoint {json_path}: the tensors file belongs to another checkpoint")
    try:
        state = unflatten(meta["state"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {json_path} is incomplete ({exc})") from None
    return int(meta["updates"]), state


def latest(folder: str | Path) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` (verified), or None when the run wrote none yet."""
    found = checkpoints(folder)
    return load(found[-1]) if found else None
