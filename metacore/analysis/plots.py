"""Comparison plots (matplotlib, Agg, PNG): the validation metric against steps, one line per controller (the mean
over seeds, a band from the lowest to the highest seed), and beneath it the hyperparameter trajectories
(``hparam/*``) that some controller changed.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global backend state), so plotting works in
worker processes and headless machines alike.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacore.core.store import History, RunRecord, Tracker

MAX_HPARAM_ROWS = 3
MAX_COLUMNS = 8
PLOT_NAME = "comparison.png"
log = logging.getLogger(__name__)


@dataclass
class Series:
    label: str  # e.g. "hypergrad" or "static (baseline)"
    seed: int | None
    histories: dict[str, History] = field(default_factory=dict)


@dataclass
class Cell:
    """One column of the figure: the runs of one task and condition."""

    title: str
    metric_key: str  # e.g. "val/accuracy"
    series: list[Series] = field(default_factory=list)


def series_label(run: RunRecord) -> str:
    return f"{run.controller} (baseline)" if run.role == "baseline" else run.controller


def load_series(store: Tracker, runs: list[RunRecord], metric_key: str) -> list[Series]:
    """Histories of the metric and of every ``hparam/*`` key for each run."""
    out = []
    for r in runs:
        keys = [metric_key] + sorted(k for k in store.metric_keys(r.run_id) if k.startswith("hparam/"))
        out.append(Series(series_label(r), r.seed, {k: store.history(r.run_id, k) for k in keys}))
    return out


def hparam_keys(cells: list[Cell]) -> list[str]:
    """The ``hparam/*`` keys to draw: those whose value moved in some run (``lr`` first); else ``hparam/lr``."""
    present, moving = set(), set()
    for cell in cells:
        for s in cell.series:
            for k, h in s.histories.items():
                if not k.startswith("hparam/") or not h:
                    continue
                present.add(k)
                values = [v for _, v in h]
                if max(values) - min(values) > 1e-12 * max(1.0, abs(max(values))):
                    moving.add(k)
    order = lambda k: (k != "hparam/lr", k)  # noqa: E731
    keys = sorted(moving, key=order) or (["hparam/lr"] if "hparam/lr" in present else [])
    return keys[:MAX_HPARAM_ROWS]


def _band(histories: list[History]) -> tuple[list[int], list[float], list[float], list[float]]:
    by_step: dict[int, list[float]] = {}
    for h in histories:
        for step, value in h:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    return steps, mean, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]


def plot_cells(cells: list[Cell], path: str | Path, title: str | None = None) -> Path:
    """Draw the cells side by side (at most ``MAX_COLUMNS``) and save a PNG at ``path``."""
    from matplotlib.figure import Figure

    if not cells:
        raise ValueError("nothing to plot")
    cells = cells[:MAX_COLUMNS]
    keys = hparam_keys(cells)
    nrows, ncols = 1 + len(keys), len(cells)
    fig = Figure(figsize=(4.4 * ncols, 2.2 + 1.7 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex="col")
    labels = sorted({s.label for c in cells for s in c.series}, key=lambda s: ("(baseline)" in s, s))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for col, cell in enumerate(cells):
        for row, key in enumerate([cell.metric_key] + keys):
            ax = axes[row][col]
            for label in labels:
                hs = [s.histories.get(key, []) for s in cell.series if s.label == label]
                hs = [h for h in hs if h]
                if not hs:
                    continue
                steps, mean, low, high = _band(hs)
                n = len(hs)
                ax.plot(steps, mean, color=colors[label], lw=1.6, label=f"{label} (n={n})" if row == 0 else None,
                        marker="o" if len(steps) <= 3 else None, ms=3)
                if n > 1:
                    ax.fill_between(steps, low, high, color=colors[label], alpha=0.18, lw=0)
            if row > 0:
                values = [v for s in cell.series for _, v in s.histories.get(key, [])]
                if values and min(values) > 0 and max(values) / min(values) > 20:
                    ax.set_yscale("log")
            ax.set_ylabel(key, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(cell.title, fontsize=9)
                ax.legend(fontsize=7, loc="best")
            if row == nrows - 1:
                ax.set_xlabel("step", fontsize=8)
    import textwrap

    fig.suptitle(textwrap.fill(title or "mean over seeds; band: lowest to highest seed", 62 * ncols), fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def summary_cell(store: Tracker, summary: dict[str, Any], metric_key: str) -> Cell:
    """The one cell of a ``metacore run``: its controller and baseline runs over seeds."""
    runs = [store.get(item["run_id"]) for item in summary.get("runs", [])]
    return Cell(f"{summary.get('task', '')} ({summary.get('preset', '')})", metric_key,
                load_series(store, runs, metric_key))


def log_comparison_plot(tracker: Tracker, parent_run_id: str, summary: dict[str, Any], task: Any = None) -> str | None:
    """Draw the runs of ``summary`` (a ``metacore run`` summary) and log the PNG on the parent run.

    Called by the runner just before the parent run ends. A plot is a convenience: any failure here is reported
    on stderr in one line and never fails the run. Returns the artifact name, or None.
    """
    try:
        if not summary.get("runs"):
            return None
        primary = getattr(task, "primary_metric", None) or "accuracy"
        cell = summary_cell(tracker, summary, f"val/{primary}")
        with tempfile.TemporaryDirectory(prefix="metacore-plot-") as tmp:
            path = plot_cells([cell], Path(tmp) / PLOT_NAME,
                              title=f"{summary.get('task', '')}: val/{primary} and hyperparameters "
                                    "(mean over seeds; band: lowest to highest seed)")
            tracker.log_artifact(parent_run_id, path)
        return PLOT_NAME
    except NotImplementedError:  # a tracker that cannot read runs back: nothing to draw from
        return None
    except Exception as exc:  # never fail a finished training run over a picture
        print(f"metacore: warning: comparison plot not logged ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
