"""Statistics over seeds: mean, sample standard deviation, Student-t 95% intervals, paired differences.

Seeds are few (2-10), so intervals use the t distribution (not the normal), the standard deviation is the sample one
(ddof=1), and a comparison with the baseline is *paired*: controller and baseline of one seed share the data order and
the initial weights, so the per-seed difference removes most of the seed-to-seed variance.
Values that cannot be computed (an interval from one seed) are ``None``, which JSON can carry and NaN cannot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

TIE_TOLERANCE = 1e-12


@dataclass
class Summary:
    n: int
    mean: float | None
    std: float | None
    ci95: list[float] | None  # [low, high]
    min: float | None = None
    max: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairedDelta:
    """``controller - baseline`` per seed; ``wins`` counts seeds where the controller is better in the metric's
    direction (higher for ``max`` metrics, lower for ``min``)."""

    n: int
    mean: float | None
    std: float | None
    ci95: list[float] | None
    p_value: float | None  # two-sided paired t-test; None when undefined (n < 2 or all differences equal)
    wins: int
    losses: int
    ties: int

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def t_interval(mean: float, std: float, n: int, confidence: float = 0.95) -> list[float] | None:
    """Student-t interval of a mean from ``n`` samples; None for n < 2."""
    if n < 2:
        return None
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return [mean - half, mean + half]


def sample_std(values: Sequence[float]) -> float | None:
    """The sample standard deviation (ddof=1) of ``values``, the spread every metacore table reports; None for
    fewer than two values."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return float(arr.std(ddof=1)) if arr.size > 1 else None


def summarize(values: Sequence[float | None]) -> Summary:
    """n, mean, sample std and 95% t-interval of the finite values (missing or non-finite ones are left out)."""
    import numpy as np

    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return Summary(0, None, None, None)
    arr = np.asarray(xs, dtype=float)
    mean = float(arr.mean())
    std = sample_std(arr)
    return Summary(n, mean, std, t_interval(mean, std, n) if std is not None else None, float(arr.min()),
                   float(arr.max()))


def paired_delta(controller: Sequence[float | None], baseline: Sequence[float | None],
                 direction: str = "max") -> PairedDelta:
    """Paired difference ``controller - baseline`` over seeds (the two sequences are aligned by seed).

    A pair where only the controller has a value (the baseline diverged) counts as a win, one where only the
    baseline has a value (the controller diverged) as a loss; both are left out of the mean and interval, which
    need two numbers.
    """
    import numpy as np

    if len(controller) != len(baseline):
        raise ValueError("paired values must be aligned by seed")
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    sign = 1.0 if direction == "max" else -1.0
    diffs: list[float] = []
    wins = losses = ties = 0
    for c, b in zip(controller, baseline, strict=True):
        c_ok = c is not None and math.isfinite(float(c))
        b_ok = b is not None and math.isfinite(float(b))
        if c_ok and b_ok:
            d = float(c) - float(b)
            diffs.append(d)
            if abs(d) <= TIE_TOLERANCE:
                ties += 1
            elif sign * d > 0:
                wins += 1
            else:
                losses += 1
        elif c_ok:
            wins += 1
        elif b_ok:
            losses += 1
    n = len(diffs)
    if n == 0:
        return PairedDelta(0, None, None, None, None, wins, losses, ties)
    arr = np.asarray(diffs)
    mean = float(arr.mean())
    std = sample_std(arr)
    ci = t_interval(mean, std, n) if std is not None else None
    p_value = None
    if n > 1 and std is not None and std > 0:
        from scipy import stats

        t = mean / (std / math.sqrt(n))
        p_value = float(2 * stats.t.sf(abs(t), df=n - 1))
    return PairedDelta(n, mean, std, ci, p_value, wins, losses, ties)
