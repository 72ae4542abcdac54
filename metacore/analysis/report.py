"""The markdown report of a comparison: a table per task and a plot per task (one column per condition).

A report can be written as a file of its own or into a section of an existing markdown file, between the markers
``<!-- metacore-bench:begin -->`` and ``<!-- metacore-bench:end -->`` (``<!-- metacore-bench:begin NAME -->`` for a
named section, so one file can hold several); the rest of that file is left as it was, so ``docs/results.md`` can
hold other sections beside the regenerated ones. A file without the markers gets the section appended.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from metacore.analysis.compare import condition_labels, group_runs
from metacore.analysis.plots import Cell, load_series, plot_cells
from metacore.core.store import RunRecord, Tracker

BEGIN = "<!-- metacore-bench:begin -->"
END = "<!-- metacore-bench:end -->"


def comparison_cells(store: Tracker, runs: list[RunRecord], result: dict[str, Any],
                     task: str | None = None) -> list[Cell]:
    """One plot cell per (task, condition) of the comparison ``result``, with the runs its rows were computed on."""
    groups, _ = group_runs(runs)
    labels = condition_labels(groups)
    metric_of = {row["task"]: row["best"]["metric"] for row in result["rows"]}
    cells: dict[tuple, Cell] = {}
    for g in sorted(groups, key=lambda g: (g.task, labels[g.config], g.role != "controller", g.controller)):
        if task is not None and g.task != task:
            continue
        key = (g.task, g.config)
        if key not in cells:
            label = labels[g.config]
            cells[key] = Cell(g.task if label == "default" else f"{g.task}: {label}", metric_of[g.task])
        cells[key].series.extend(load_series(store, g.runs, metric_of[g.task]))
    return list(cells.values())


def _f(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(ci: list[float] | None, digits: int = 4) -> str:
    return "–" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| condition | controller | role | n | final mean ± std | 95% CI | best val mean | Δ vs baseline | "
            "Δ 95% CI | p (paired t) | W/L/T | diverged | train s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        d = r["delta_vs_baseline"]
        lines.append("| " + " | ".join([
            r["condition"], r["controller"], r["role"], str(r["n"]), f"{_f(r['mean'])} ± {_f(r['std'])}",
            _ci(r["ci95"]), _f(r["best"]["mean"]),
            "–" if d is None or d["mean"] is None else f"{d['mean']:+.4f}", "–" if d is None else _ci(d["ci95"]),
            "–" if d is None or d["p_value"] is None else f"{d['p_value']:.3g}",
            "–" if d is None else f"{r['wins']}/{r['losses']}/{r['ties']}", str(r["diverged"]),
            _f(r["wall_s"], 1)]) + " |")
    return "\n".join(lines)


def report_markdown(result: dict[str, Any], plots: dict[str, str], *, heading: str, command: str | None = None,
                    meta: dict[str, Any] | None = None, level: int = 2) -> str:
    """Markdown of a comparison ``result``; ``plots`` maps a task to a PNG path relative to the report."""
    h = "#" * level
    out = [f"{h} {heading}", ""]
    if command:
        out += ["Regenerate with:", "", "```", command, "```", ""]
    for key, value in (meta or {}).items():
        out.append(f"- {key}: {value}")
    out += [f"- statistic: final {result['split']} metric per seed; mean ± sample std, Student-t 95% CI; "
            "Δ = controller − baseline of the same seed (paired), W/L/T = seeds where the controller is "
            "better/worse/equal in the metric's direction; best val = best validation value seen during training",
            ""]
    for task in sorted({r["task"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["task"] == task]
        out += [f"{h}# {task} ({rows[0]['metric']}, {'higher' if rows[0]['direction'] == 'max' else 'lower'} "
                "is better)", "", table_markdown(rows), ""]
        if task in plots:
            out += [f"![{task}: {rows[0]['best']['metric']} and hyperparameters against steps]"
                    f"({plots[task]})", ""]
    return "\n".join(out).rstrip() + "\n"


def markers(section: str | None = None) -> tuple[str, str]:
    """The begin/end markers of a report section (``section`` names one of several in a file)."""
    if not section:
        return BEGIN, END
    return BEGIN.replace(" -->", f" {section} -->"), END.replace(" -->", f" {section} -->")


def write_report(path: str | Path, body: str, section: str | None = None) -> Path:
    """Write ``body`` between the section's markers where ``path`` already has them (keeping the rest of the file),
    else append it as a new marked section to an existing file, or write a new file."""
    path = Path(path)
    begin, end = markers(section)
    block = f"{begin}\n{body}{end}\n"
    if path.is_file():
        text = path.read_text()
        if begin in text and end in text.split(begin, 1)[1]:
            before, rest = text.split(begin, 1)
            after = rest.split(end, 1)[1].lstrip("\n")
            path.write_text(before + block + ("\n" + after if after else ""))
        else:
            path.write_text(text.rstrip("\n") + "\n\n" + block)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block)
    return path


def build_report(store: Tracker, runs: list[RunRecord], result: dict[str, Any], report_path: str | Path,
                 plot_dir: str | Path | None = None, *, heading: str = "metacore bench", command: str | None = None,
                 meta: dict[str, Any] | None = None, prefix: str = "bench",
                 section: str | None = None) -> tuple[Path, list[Path]]:
    """Plots (one PNG per task) and the markdown report; returns the report path and the plot paths."""
    report_path = Path(report_path)
    plot_dir = Path(plot_dir) if plot_dir else report_path.parent / "img"
    plots, paths = {}, []
    for task in sorted({r["task"] for r in result["rows"]}):
        cells = comparison_cells(store, runs, result, task)
        if not cells:
            continue
        png = plot_cells(cells, plot_dir / f"{prefix}-{task}.png",
                         title=f"{task}: validation metric and hyperparameters against steps "
                               "(mean over seeds; band: lowest to highest seed)")
        paths.append(png)
        plots[task] = Path(os.path.relpath(png.resolve(), report_path.parent.resolve())).as_posix()
    body = report_markdown(result, plots, heading=heading, command=command, meta=meta)
    return write_report(report_path, body, section), paths
