"""Data plumbing shared by the real-data tasks: where data come from, where decoded arrays are cached.

Each task looks first in the local root (``--data-dir`` / ``METACORE_DATA_DIR``, laid out like ``shared/data``:
``cifar10/``, ``imdb/``, ``electricity/``), then falls back to the original source (the Hugging Face hub, the UCI
archive), caching what it downloads. With neither, :func:`missing_data` raises a :class:`DataError` that says what to
pass, so the CLI exits 2 with one line instead of a traceback from deep inside ``datasets``.

Work that is expensive and deterministic (JPEG decoding, tokenisation, parsing a 700 MB text file) is cached on disk
under ``METACORE_CACHE_DIR`` (default ``~/.cache/metacore``), keyed by the source files' identity (path, size,
modification time) and the parameters of the transformation, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from metacore.core.errors import DataError, first_line

_TRUE = {"1", "true", "yes", "on"}


def cache_dir(*parts: str) -> Path:
    """``METACORE_CACHE_DIR`` (default ``~/.cache/metacore``), joined with ``parts``."""
    root = os.environ.get("METACORE_CACHE_DIR") or str(Path.home() / ".cache" / "metacore")
    return Path(root).expanduser().joinpath(*parts)


def offline() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or ``METACORE_OFFLINE``)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "METACORE_OFFLINE"))


def local_dir(data_dir: Path | str | None, name: str) -> Path | None:
    """``<data_dir>/<name>`` if it exists, else None."""
    if data_dir is None:
        return None
    path = Path(data_dir) / name
    return path if path.is_dir() else None


def missing_data(task: str, expected: str, source: str, reason: str = "") -> DataError:
    """The one error a task raises when neither local data nor the original source is available."""
    why = f" ({reason})" if reason else ""
    return DataError(
        f"no data for task {task}: pass --data-dir DIR (or set METACORE_DATA_DIR) with {expected}, "
        f"in the layout of shared/data; {source} is not reachable{why}"
    )


def file_identity(paths: Iterable[Path]) -> list[list[Any]]:
    """Path, size and modification time of each file: a cache key that changes when a file does."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(Path(p).resolve()), st.st_size, int(st.st_mtime)])
    return out


def cache_key(**parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached(namespace: str, key: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``build()`` once, then load it from ``cache_dir(namespace, key + '.pt')`` (tensors and plain values).

    The file is written atomically, so an interrupted run never leaves a truncated cache behind; an unreadable cache
    file is rebuilt. A cache directory that cannot be written only costs the caching, not the run.
    """
    import torch

    path = cache_dir(namespace, f"{key}.pt")
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is rebuilt, never fatal
            path.unlink(missing_ok=True)
    value = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(value, tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def read_parquet(path: Path, columns: list[str] | None = None, rows: int | None = None):
    """A parquet file as a pyarrow table (only ``columns``; only the first ``rows`` if given), checked."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if rows is None:
            table = pf.read(columns=columns)
        else:
            batches, have = [], 0
            for batch in pf.iter_batches(batch_size=min(rows, 4096), columns=columns):
                batches.append(batch)
                have += batch.num_rows
                if have >= rows:
                    break
            import pyarrow as pa

            table = pa.Table.from_batches(batches) if batches else pf.read(columns=columns)
            table = table.slice(0, rows)
    except Exception as exc:  # pyarrow raises several types for truncated or non-parquet files
        raise DataError(f"cannot read {path}: {exc}") from None
    missing = [c for c in columns or [] if c not in table.column_names]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")
    return table


def load_hub_dataset(task: str, hub_id: str, expected: str, **kwargs: Any):
    """``datasets.load_dataset(hub_id)`` cached under the metacore cache; a DataError naming --data-dir if it fails."""
    if offline():
        raise missing_data(task, expected, f"the Hugging Face hub ({hub_id})", "offline mode is set")
    try:
        import datasets

        return datasets.load_dataset(hub_id, cache_dir=str(cache_dir("hf-datasets")), **kwargs)
    except Exception as exc:
        raise missing_data(task, expected, f"the Hugging Face hub ({hub_id})",
                           first_line(exc, with_type=True)) from None
