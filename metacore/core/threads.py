"""How many CPU threads torch may use for one training process (``metacore run --threads``, ``METACORE_THREADS``).

torch's default is one intra-op thread per core. On a machine where other processes keep the cores busy, a parallel
op waits for its slowest thread, and a descheduled thread stalls every small op: the same training steps then take
many times longer than on one thread (docs/performance.md). The default here counts only the cores that are free: the
cores this process may run on minus the load already on them (the 1-minute load average), at least one.
"""

from __future__ import annotations

import os

from metacore.core.errors import UsageError

ENV = "METACORE_THREADS"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def free_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores not already busy: ``cores`` minus the 1-minute load average, rounded, at least 1."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, cores - int(load + 0.5)))


def resolve_threads(value: str | int | None, flag: str = "--threads") -> int:
    """The thread count for ``value`` (a number or ``auto``); None falls back to ``METACORE_THREADS``, then auto."""
    source = flag
    if value is None:
        value, source = os.environ.get(ENV) or "auto", ENV
    text = str(value).strip().lower()
    if text == "auto":
        return free_cores()
    try:
        threads = int(text)
    except ValueError:
        raise UsageError(f"{source} expects a number of threads or 'auto', got {value!r}") from None
    if threads < 1:
        raise UsageError(f"{source} must be at least 1, got {value!r}")
    return threads


def apply_threads(threads: int) -> None:
    """Set torch's intra-op thread count (imports torch; call it when training is about to start)."""
    import torch

    torch.set_num_threads(threads)
