"""Grouping, pairing, plots and reports over runs made the way the runner makes them, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metacore.analysis.compare import compare
from metacore.analysis.plots import Cell, Series, hparam_keys, log_comparison_plot, plot_cells
from metacore.analysis.report import BEGIN, END, build_report, markers, write_report
from metacore.core.tracking import MemoryTracker

PNG = b"\x89PNG\r\n\x1a\n"


def _parent(tracker, controller="hypergrad", baseline="static", experiment="digits", parent_id=None):
    return tracker.start_run(experiment, f"{controller} vs {baseline}", parent_id=parent_id,
                             tags={"metacore.role": "parent", "metacore.task": "digits",
                                   "metacore.controller": controller, "metacore.baseline": baseline})


def _child(tracker, parent, controller, role, seed, final, *, lr=0.01, task="digits", metric="accuracy",
           lr_decay=0.0, diverged=False, status="FINISHED", experiment="digits"):
    run_id = tracker.start_run(experiment, f"{controller} seed {seed}", parent_id=parent,
                               tags={"metacore.role": role, "metacore.controller": controller, "metacore.task": task,
                                     "metacore.seed": str(seed)},
                               params={"task": task, "preset": "smoke", "seed": seed, "budget_steps": 30,
                                       "hparam.lr": lr, "option.width": 8, "controller": controller})
    for step in (10, 20, 30):
        tracker.log_metrics(run_id, {"train/loss": 1.0 / step, "hparam/lr": lr * (1 - lr_decay * step / 30),
                                     "hparam/momentum": 0.9}, step)
        if not diverged:
            tracker.log_metrics(run_id, {f"val/{metric}": final * step / 30}, step)
    if not diverged:
        tracker.log_metrics(run_id, {f"test/{metric}": final}, 30)
    tracker.set_tags(run_id, {"metacore.diverged": str(diverged).lower()})
    tracker.end_run(run_id, status)
    return run_id


def _experiment(tracker, ctrl=(0.90, 0.85, 0.95), base=(0.80, 0.86, 0.70)):
    parent = _parent(tracker)
    for seed, (c, b) in enumerate(zip(ctrl, base, strict=True)):
        _child(tracker, parent, "hypergrad", "controller", seed, c, lr_decay=0.5)
        _child(tracker, parent, "static", "baseline", seed, b)
    return parent


def _compare(tracker, experiment="digits", **kw):
    runs = tracker.experiment_runs(experiment)
    return tracker, runs, compare(tracker, runs, experiment, **kw)


def _row(result, controller, role=None):
    rows = [r for r in result["rows"] if r["controller"] == controller and (role is None or r["role"] == role)]
    assert len(rows) == 1, result["rows"]
    return rows[0]


def test_rows_hold_statistics_and_the_paired_delta():
    tracker = MemoryTracker()
    _experiment(tracker)
    _, _, result = _compare(tracker)
    assert result["experiment"] == "digits" and result["primary_metric"] == "accuracy"
    hg, st = _row(result, "hypergrad"), _row(result, "static")
    assert (hg["role"], st["role"]) == ("controller", "baseline")
    assert hg["n"] == st["n"] == 3 and hg["seeds"] == [0, 1, 2]
    assert hg["mean"] == pytest.approx(0.9) and hg["std"] == pytest.approx(0.05)
    diffs = np.array([0.10, -0.01, 0.25])
    assert hg["delta_vs_baseline"]["mean"] == pytest.approx(diffs.mean())
    assert hg["delta_vs_baseline"]["std"] == pytest.approx(diffs.std(ddof=1))
    assert (hg["wins"], hg["losses"], hg["ties"]) == (2, 1, 0)
    assert hg["baseline"] == "static" and st["delta_vs_baseline"] is None
    assert hg["best"]["mean"] == pytest.approx(0.9)  # the best validation value is the last one here
    json.dumps(result)  # JSON-serializable: no NaN, no numpy scalars


def test_the_newest_run_of_a_seed_counts_once_and_unfinished_runs_are_left_out():
    tracker = MemoryTracker()
    _experiment(tracker, ctrl=(0.1, 0.1, 0.1))
    _experiment(tracker)  # the same command again, newer
    parent = _parent(tracker)
    _child(tracker, parent, "hypergrad", "controller", 3, 0.99, status="FAILED")
    _, _, result = _compare(tracker)
    hg = _row(result, "hypergrad")
    assert hg["n"] == 3 and hg["mean"] == pytest.approx(0.9)
    assert result["skipped_runs"] == 1


def test_runs_pair_by_condition_and_seed_across_parents_and_conditions_stay_apart():
    tracker = MemoryTracker()
    for lr in (0.1, 0.001):  # like a bench: the baseline beside the first controller only
        p1 = _parent(tracker)
        p2 = _parent(tracker, controller="cosine", baseline="none")
        for seed in (0, 1):
            _child(tracker, p1, "hypergrad", "controller", seed, 0.9 - seed / 10, lr=lr)
            _child(tracker, p1, "static", "baseline", seed, 0.5 + lr, lr=lr)
            _child(tracker, p2, "cosine", "controller", seed, 0.7, lr=lr)
    _, _, result = _compare(tracker)
    assert len(result["rows"]) == 6
    for r in result["rows"]:
        assert r["n"] == 2 and r["condition"] in ("lr=0.1", "lr=0.001")
    cos = [r for r in result["rows"] if r["controller"] == "cosine"]
    for r in cos:
        base = 0.5 + float(r["condition"].split("=")[1])
        assert r["delta_vs_baseline"]["mean"] == pytest.approx(0.7 - base)
        assert r["delta_vs_baseline"]["n"] == 2


def test_lower_is_better_metrics_and_diverged_runs():
    tracker = MemoryTracker()
    parent = _parent(tracker, experiment="power")
    for seed, (c, b) in enumerate([(0.2, 0.3), (0.25, 0.2), (None, 0.3)]):
        _child(tracker, parent, "hypergrad", "controller", seed, c or 0, task="power-x", metric="mae",
               diverged=c is None, experiment="power")
        _child(tracker, parent, "static", "baseline", seed, b, task="power-x", metric="mae", experiment="power")
    _, _, result = _compare(tracker, "power")
    hg = _row(result, "hypergrad")
    assert hg["metric"] == "test/mae" and hg["direction"] == "min"
    assert hg["n"] == 2 and hg["diverged"] == 1
    assert (hg["wins"], hg["losses"]) == (1, 2)  # the diverged seed is a loss
    assert hg["delta_vs_baseline"]["mean"] == pytest.approx(np.mean([-0.1, 0.05]))


def test_plot_and_report_from_logged_runs(tmp_path):
    tracker = MemoryTracker()
    _experiment(tracker)
    source, runs, result = _compare(tracker)
    report, plots = build_report(source, runs, result, tmp_path / "docs" / "report.md", heading="digits check")
    assert [p.name for p in plots] == ["bench-digits.png"]
    assert plots[0].read_bytes()[:8] == PNG and plots[0].parent == tmp_path / "docs" / "img"
    text = report.read_text()
    assert "## digits check" in text and "](img/bench-digits.png)" in text
    assert "| default | hypergrad | controller | 3 | 0.9000 ± 0.0500 |" in text


def test_hparam_rows_show_what_moved():
    moving = Series("hypergrad", 0, {"val/accuracy": [(1, 0.5)], "hparam/lr": [(1, 0.1), (2, 0.05)],
                                     "hparam/momentum": [(1, 0.9), (2, 0.9)]})
    fixed = Series("static (baseline)", 0, {"val/accuracy": [(1, 0.4)], "hparam/lr": [(1, 0.1), (2, 0.1)]})
    assert hparam_keys([Cell("t", "val/accuracy", [moving, fixed])]) == ["hparam/lr"]
    assert hparam_keys([Cell("t", "val/accuracy", [fixed])]) == ["hparam/lr"]


def test_report_section_keeps_the_rest_of_the_file(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(f"# Results\n\nother section\n\n{BEGIN}\nold\n{END}\n\n## Someone else's\nkept\n")
    write_report(path, "new table\n")
    text = path.read_text()
    assert "old" not in text and "new table" in text
    assert text.startswith("# Results\n\nother section\n") and text.rstrip().endswith("kept")
    write_report(tmp_path / "fresh.md", "body\n")
    assert (tmp_path / "fresh.md").read_text() == f"{BEGIN}\nbody\n{END}\n"
    write_report(path, "digits part\n", section="digits")  # a named section is appended, then replaced in place
    write_report(path, "digits again\n", section="digits")
    text = path.read_text()
    assert "new table" in text and "digits part" not in text and text.count("digits again") == 1
    assert text.rstrip().endswith(markers("digits")[1]) and text.index("kept") < text.index("digits again")


def test_runner_logs_the_comparison_plot_on_the_parent():
    from metacore.app.runner import RunRequest, run

    tracker = MemoryTracker()
    summary = run(RunRequest(task="digits", controller="cosine", preset="smoke", steps=10, device="cpu"),
                  tracker=tracker)
    parent = tracker.runs[summary["parent_run_id"]]
    assert "comparison.png" in parent["artifacts"] and "summary.json" in parent["artifacts"]


def test_a_plotting_failure_never_fails_the_run(capsys):
    class Broken(MemoryTracker):
        def log_artifact(self, run_id, path):
            raise OSError("disk full")

    tracker = Broken()
    parent = _experiment(tracker)
    children = [rid for rid, r in tracker.runs.items() if r["parent_id"] == parent]
    summary = {"task": "digits", "preset": "smoke", "runs": [{"run_id": rid} for rid in children]}
    assert log_comparison_plot(tracker, parent, summary) is None
    assert "comparison plot not logged" in capsys.readouterr().err
    assert log_comparison_plot(MemoryTracker(), parent, {"runs": []}) is None


def test_plot_cells_writes_a_png(tmp_path):
    s = [Series("a", seed, {"val/accuracy": [(10, 0.1 * seed), (20, 0.2)], "hparam/lr": [(10, 1e-3), (20, 1e-1)]})
         for seed in range(3)]
    out = plot_cells([Cell("x", "val/accuracy", s)], tmp_path / "sub" / "p.png")
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(ValueError):
        plot_cells([], tmp_path / "none.png")


# --------------------------------------------------------------------------------------------- the real CLI
def test_cli_run_then_compare_json_and_plot(cli, tmp_path):
    run = cli("run", "--task", "digits", "--controller", "cosine", "--preset", "smoke", "--steps", "20",
              "--seeds", "2", "--device", "cpu", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    out = cli("compare", "--experiment", "digits", "--json", "--plot", "cmp.png")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["primary_metric"] == "accuracy"
    rows = {r["controller"]: r for r in result["rows"]}
    assert set(rows) == {"cosine", "static"} and rows["cosine"]["n"] == rows["static"]["n"] == 2
    finals = {(r["controller"], r["seed"]): r["final"]["test/accuracy"] for r in summary["runs"]}
    assert rows["cosine"]["mean"] == pytest.approx(np.mean([finals[("cosine", 0)], finals[("cosine", 1)]]))
    diffs = [finals[("cosine", s)] - finals[("static", s)] for s in (0, 1)]
    assert rows["cosine"]["delta_vs_baseline"]["mean"] == pytest.approx(np.mean(diffs))
    assert (tmp_path / "cmp.png").read_bytes()[:8] == PNG
    pngs = list((tmp_path / "mlflow_runs").rglob("comparison.png"))
    assert len(pngs) == 1 and summary["parent_run_id"] in str(pngs[0])


def test_cli_compare_bad_input_is_one_line_and_exit_2(cli, tmp_path):
    missing = cli("compare", "--experiment", "digits")
    assert missing.returncode == 2 and "no MLflow store" in missing.stderr
    assert not (tmp_path / "mlflow_runs").exists()  # reading never creates a store
    both = cli("compare", "--experiment", "digits", "--run", "x")
    assert both.returncode == 2 and len(both.stderr.strip().splitlines()) == 1
