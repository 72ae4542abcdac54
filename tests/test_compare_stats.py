"""Statistics against numpy/scipy on fixed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from metacore.analysis.stats import paired_delta, summarize, t_interval


def test_summarize_matches_numpy_and_scipy():
    xs = [0.81, 0.86, 0.84, 0.90]
    s = summarize(xs)
    assert s.n == 4
    assert s.mean == pytest.approx(np.mean(xs))
    assert s.std == pytest.approx(np.std(xs, ddof=1))
    low, high = stats.t.interval(0.95, df=3, loc=np.mean(xs), scale=stats.sem(xs))
    assert s.ci95 == pytest.approx([low, high])
    assert (s.min, s.max) == (0.81, 0.90)


def test_summarize_leaves_out_missing_and_nonfinite_values():
    s = summarize([0.5, None, float("nan"), 0.7])
    assert s.n == 2
    assert s.mean == pytest.approx(0.6)
    assert s.std == pytest.approx(math.sqrt(0.02))


def test_one_seed_has_no_interval_and_none_has_no_mean():
    assert summarize([0.9]).ci95 is None and summarize([0.9]).std is None
    assert summarize([]).mean is None and summarize([None]).n == 0
    assert t_interval(1.0, 0.5, 1) is None


def test_paired_delta_matches_paired_t_test():
    ctrl = [0.91, 0.88, 0.93, 0.90, 0.87]
    base = [0.85, 0.86, 0.88, 0.91, 0.80]
    d = paired_delta(ctrl, base, "max")
    diffs = np.subtract(ctrl, base)
    assert d.n == 5
    assert d.mean == pytest.approx(diffs.mean())
    assert d.std == pytest.approx(diffs.std(ddof=1))
    assert d.ci95 == pytest.approx(list(stats.t.interval(0.95, df=4, loc=diffs.mean(), scale=stats.sem(diffs))))
    assert d.p_value == pytest.approx(stats.ttest_rel(ctrl, base).pvalue)
    assert (d.wins, d.losses, d.ties) == (4, 1, 0)


def test_direction_min_counts_lower_as_a_win():
    d = paired_delta([0.10, 0.30, 0.20], [0.20, 0.25, 0.20], "min")
    assert (d.wins, d.losses, d.ties) == (1, 1, 1)
    assert d.mean == pytest.approx(np.mean([-0.10, 0.05, 0.0]))


def test_diverged_runs_count_in_wins_and_losses_but_not_in_the_mean():
    d = paired_delta([None, 0.8, 0.9], [0.7, None, 0.6], "max")
    assert (d.wins, d.losses) == (2, 1)
    assert d.n == 1 and d.mean == pytest.approx(0.3) and d.ci95 is None and d.p_value is None


def test_paired_delta_rejects_misaligned_input():
    with pytest.raises(ValueError):
        paired_delta([1.0, 2.0], [1.0], "max")
    with pytest.raises(ValueError):
        paired_delta([1.0], [1.0], "up")
