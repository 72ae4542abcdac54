"""``metacore compare``: statistics over seeds of logged runs against their baseline, as a table, JSON or a plot."""

from __future__ import annotations

import argparse
import json
from typing import Any

from metacore.commands import flags

NAME = "compare"


def add_parser(sub: Any) -> None:
    cmp = sub.add_parser(NAME, help="mean, std, 95%% CI over seeds and the paired difference against the baseline")
    which = cmp.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="every run of this MLflow experiment (default name: the task)")
    which.add_argument("--run", metavar="PARENT_ID", help="the runs below one parent run (a `run` or a `bench`)")
    cmp.add_argument("--split", choices=["test", "val"], default="test",
                     help="which final metric the statistics use (default test; best is always over validation)")
    cmp.add_argument("--metric", help="metric name (default: the task's primary metric)")
    cmp.add_argument("--plot", metavar="PATH", help="write a PNG: validation metric and hparam/* against steps")
    flags.add(cmp, [flags.TRACKING_URI, flags.JSON])


def main(args: argparse.Namespace) -> int:
    from metacore.analysis.compare import compare
    from metacore.core.errors import UsageError
    from metacore.core.tracking import MlflowTracker

    store = MlflowTracker(args.tracking_uri, create=False)
    if args.run:
        experiment, runs = store.runs_under(args.run)
    else:
        experiment, runs = args.experiment, store.experiment_runs(args.experiment)
    result = compare(store, runs, experiment, split=args.split, metric=args.metric)
    if args.run:
        result["parent_run_id"] = args.run
    if not result["rows"]:
        where = f"below run {args.run}" if args.run else f"in experiment {experiment!r}"
        raise UsageError(f"no finished controller or baseline runs {where}")
    if args.plot:
        from metacore.analysis.plots import plot_cells
        from metacore.analysis.report import comparison_cells

        result["plot"] = str(plot_cells(comparison_cells(store, runs, result), args.plot))
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(ci: list[float] | None, digits: int = 4) -> str:
    return "-" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    rows = result["rows"]
    many_tasks = len({r["task"] for r in rows}) > 1
    table = Table(title=f"experiment {result['experiment']}: final {result['split']} {result['primary_metric']} "
                  "over seeds; Δ = paired difference with the baseline of the same seed")
    cols = (["task"] if many_tasks else []) + ["condition", "controller", "n", "mean ± std", "95% CI", "best val",
                                               "Δ vs baseline [95% CI]", "W/L/T", "div", "train s"]
    for col in cols:
        table.add_column(col, overflow="fold")
    for r in rows:
        d = r["delta_vs_baseline"]
        delta = "-" if d is None or d["mean"] is None else f"{d['mean']:+.4f} {_ci(d['ci95'])}"
        name = r["controller"] + (" (baseline)" if r["role"] == "baseline" else "")
        cells = ([r["task"]] if many_tasks else []) + [
            r["condition"], name, str(r["n"]), f"{_fmt(r['mean'])} ± {_fmt(r['std'])}", _ci(r["ci95"]),
            _fmt(r["best"]["mean"]), delta, "-" if d is None else f"{r['wins']}/{r['losses']}/{r['ties']}",
            str(r["diverged"]), _fmt(r["wall_s"], 1)]
        table.add_row(*cells)
    console.print(table)
    if result.get("skipped_runs"):
        console.print(f"{result['skipped_runs']} run(s) that did not finish were left out")
    if result.get("plot"):
        console.print(f"plot: {result['plot']}")
