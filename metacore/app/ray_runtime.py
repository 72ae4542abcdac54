"""Connecting to Ray: a local instance by default (small: the machine's cores, no dashboard, a temp dir under
/tmp), or an existing cluster by ``--address``. An unreachable address or a missing Ray is bad input (exit 2).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from metacore.core.errors import UsageError

INSTALL_HINT = 'pip install "metacore[ray]"'
CONNECT_TIMEOUT_S = 5.0


def require_ray(what: str) -> Any:
    """The ``ray`` module, or a UsageError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"{what} needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_address(address: str) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) must accept a TCP connection now; ``auto`` is left to Ray."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--address expects HOST:PORT (the head's GCS port, 6379 by default) or auto, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def ray_session(address: str | None, what: str, num_cpus: int | None = None) -> Iterator[Any]:
    """``ray.init`` for the duration of the block, then ``ray.shutdown``. Yields the ``ray`` module."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, Tune prints no tables of its own
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray = require_ray(what)
    if address:
        check_address(address)
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        if address:
            kwargs["address"] = address
        else:
            temp = Path(tempfile.gettempdir()) / "metacore-ray"
            temp.mkdir(parents=True, exist_ok=True)
            kwargs.update(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, _temp_dir=str(temp))
        try:
            ray.init(**kwargs)
        except (ConnectionError, TimeoutError, ValueError) as exc:
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            raise UsageError(f"cannot start or join Ray{' at ' + address if address else ''}: {lines[0]}") from None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Ray prints worker deaths etc. on stdout; --json owns stdout
            yield ray
    finally:
        if started_here:
            ray.shutdown()


def absolute_tracking_uri(uri: str) -> str:
    """A relative SQLite store made absolute, so Ray workers with another working directory write the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def is_local_store(uri: str) -> bool:
    """A store that only processes on this machine can reach (a file path, SQLite), not a tracking server."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else "file"
    return scheme in ("file", "sqlite")
