"""Checkpoints written atomically (temporary file, fsync, rename) with a SHA-256 beside each, the last few kept.

Payloads hold tensors and plain values only, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from metacore.core.errors import CheckpointError

PATTERN = "step-{step:09d}.pt"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(payload: dict[str, Any], directory: str | Path, step: int, keep: int = 3) -> Path:
    """Write ``payload`` as ``step-NNNNNNNNN.pt`` (+ ``.sha256``) atomically; prune to the newest ``keep``."""
    import torch

    directory = Path(directory)
    target = directory / PATTERN.format(step=step)
    tmp = target.with_suffix(".pt.tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, target)
        sidecar = target.with_suffix(".pt.sha256")
        sidecar_tmp = sidecar.with_suffix(".tmp")
        sidecar_tmp.write_text(digest + "\n")
        os.replace(sidecar_tmp, sidecar)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint in {directory}: {exc.strerror or exc}") from None
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".pt.sha256").unlink(missing_ok=True)
    return target


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in step order, oldest first."""
    directory = Path(directory)
    return sorted(directory.glob("step-*.pt")) if directory.is_dir() else []


def is_intact(path: Path) -> bool:
    sidecar = path.with_suffix(".pt.sha256")
    try:
        return sidecar.read_text().strip() == sha256_file(path)
    except OSError:
        return False


def load_latest(directory: str | Path, map_location: Any = "cpu") -> tuple[Path, dict[str, Any]]:
    """The newest intact checkpoint; a corrupted newer one is skipped with a note on stderr."""
    import torch

    for path in reversed(list_checkpoints(directory)):
        if not is_intact(path):
            print(f"metacore: checkpoint {path} is corrupted (checksum mismatch); trying an older one", file=sys.stderr)
            continue
        return path, torch.load(path, map_location=map_location, weights_only=True)
    raise CheckpointError(f"no intact checkpoint in {directory}")


# What a trainer checkpoint holds; older payloads without the optional keys still resume.
PAYLOAD_KEYS = ("step", "epoch", "pos", "model", "optimizer", "controller", "hparams", "train_losses", "val_metrics",
                "val_history", "best", "rollbacks", "wall_s", "first_loss", "loss_sum", "loss_n", "rng")
OPTIONAL_KEYS = ("last_val_step", "diverged", "extra_passes", "kept")


def check_payload(payload: Any, source: str = "the checkpoint") -> None:
    """Raise :class:`CheckpointError` (exit 2, saying why) for a payload a trainer cannot continue from."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"{source} holds a {type(payload).__name__}, not a metacore trainer checkpoint")
    missing = [k for k in PAYLOAD_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}: it was not written by a metacore trainer this "
                              "version can continue; start the run afresh")
_PLAIN = (bool, int, float, str, bytes, type(None))


def _first_unsafe(obj: Any, path: str) -> str | None:
    """The path of the first value ``torch.load(weights_only=True)`` would refuse, with its type; None if none."""
    import torch

    if isinstance(obj, (torch.Tensor, torch.Size, torch.dtype, torch.device)) or type(obj) in _PLAIN:
        return None
    if isinstance(obj, dict) and type(obj).__module__ in ("builtins", "collections"):
        for key, value in obj.items():
            if type(key) not in _PLAIN:
                return f"{path} has a key of type {type(key).__name__}"
            found = _first_unsafe(value, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            found = _first_unsafe(value, f"{path}[{i}]")
            if found:
                return found
        return None
    return f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}"


def check_checkpointable(state: Any) -> None:
    """Refuse a state that a checkpoint could not hold (it would fail to load with ``weights_only=True``).

    Called on a controller's first ``state_dict()`` when a run starts, so the mistake shows at once, not when the
    end-of-run checkpoint is read back.
    """
    import io

    import torch

    found = _first_unsafe(state, "state_dict()")
    if found is None:
        try:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception as exc:
            found = f"state_dict() does not load back with weights_only=True ({type(exc).__name__})"
    if found:
        from metacore.core.errors import ControllerError

        raise ControllerError(
            f"{found}; a checkpoint holds only tensors and plain values (numbers, strings, bools, None, "
            "lists, tuples, dicts), so convert it in state_dict() and back in load_state_dict()")
