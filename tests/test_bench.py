"""``metacore bench``: grid planning, nesting below one parent, concurrent workers that lose no metric."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from metacore.app.bench import BenchRequest, parse_grid, plan_bench
from metacore.core.errors import UsageError
from metacore.core.tracking import MemoryTracker


def test_parse_grid():
    assert parse_grid(["lr=1e-3, 1e-1", "momentum=0.5"]) == {"lr": ["1e-3", "1e-1"], "momentum": ["0.5"]}
    for bad in (["lr"], ["lr="], ["=1"], ["lr=1", "lr=2"]):
        with pytest.raises(UsageError):
            parse_grid(bad)


def test_plan_runs_the_baseline_once_per_grid_point_and_seed():
    req = BenchRequest(tasks=["digits"], controllers=["cosine", "static", "linear-warmup"], seeds=2,
                       grid={"lr": ["1e-3", "1e-1"]}, preset="smoke", device="cpu")
    units = plan_bench(req)
    assert len(units) == 2 * 2 * 2  # grid points x non-baseline controllers x seeds
    runs = sum(1 + (u.request.baseline is not None) for u in units)
    assert runs == 2 * 3 * 2  # every controller once per grid point and seed, the baseline included
    assert {u.request.sets["lr"] for u in units} == {"1e-3", "1e-1"}
    assert all(u.request.seeds == 1 for u in units)
    assert {(u.request.controller, u.request.baseline) for u in units} == {("cosine", "static"),
                                                                           ("linear-warmup", None)}


@pytest.mark.parametrize("change, message", [
    ({"grid": {"nope": ["1"]}}, "nope"),
    ({"grid": {"lr": ["-1"]}}, "lr"),
    ({"controllers": ["cosine", "cosine"]}, "twice"),
    ({"controllers": ["bogus"]}, "bogus"),
    ({"workers": 0}, "workers"),
    ({"tasks": ["bogus"]}, "bogus"),
    ({"grid": {"lr": ["0.1"]}, "sets": {"lr": "0.2"}}, "lr"),
])
def test_plan_rejects_bad_input_before_anything_runs(change, message):
    req = BenchRequest(**{**dict(tasks=["digits"], controllers=["cosine"], preset="smoke", device="cpu"), **change})
    with pytest.raises(UsageError, match=message):
        plan_bench(req)


def test_nested_tracker_puts_top_level_runs_below_the_bench():
    inner = MemoryTracker()
    bench = inner.start_run("digits", "bench")
    nested = inner.nested(bench, {"metacore.bench": bench})
    parent = nested.start_run("digits", "run", tags={"metacore.role": "parent"})
    child = nested.start_run("digits", "child", parent_id=parent)
    assert inner.runs[parent]["parent_id"] == bench and inner.runs[child]["parent_id"] == parent
    assert inner.runs[child]["tags"]["metacore.bench"] == bench
    assert nested.uri == inner.uri


def _metric_steps(db: Path, run_id: str, key: str) -> list[int]:
    with sqlite3.connect(db) as con:
        return sorted(s for (s,) in con.execute("SELECT step FROM metrics WHERE run_uuid=? AND key=?", (run_id, key)))


def test_cli_bench_two_workers_lose_no_metric(cli, tmp_path):
    out = cli("bench", "--task", "digits", "--controllers", "cosine,static", "--seeds", "1", "--grid",
              "lr=1e-2,5e-2", "--preset", "smoke", "--steps", "10", "--workers", "2", "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["runs"]) == 4 and not result["failures"]
    assert {(r["controller"], r["grid"]["lr"]) for r in result["runs"]} == {
        (c, lr) for c in ("cosine", "static") for lr in ("1e-2", "5e-2")}
    db = tmp_path / "mlflow_runs" / "mlflow.db"
    for r in result["runs"]:  # smoke logs every 5 steps; the trainer evaluates at the end
        assert _metric_steps(db, r["run_id"], "train/loss") == [5, 10]
        assert _metric_steps(db, r["run_id"], "hparam/lr") == [5, 10]
        assert _metric_steps(db, r["run_id"], "val/accuracy") == [10]
        assert _metric_steps(db, r["run_id"], "test/accuracy") == [10]
    with sqlite3.connect(db) as con:  # one bench parent; each grid point's parent below it
        parents = dict(con.execute("SELECT run_uuid, value FROM tags WHERE key='mlflow.parentRunId'"))
    bench = result["parent_run_id"]
    for r in result["runs"]:
        assert parents[r["run_id"]] == r["run_parent_id"] and parents[r["run_parent_id"]] == bench
    report = tmp_path / result["report"]
    text = report.read_text()
    assert "| lr=0.01 | cosine | controller | 1 |" in text and "| lr=0.05 | static | baseline | 1 |" in text
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in result["plots"])
    from metacore.analysis.compare import compare
    from metacore.core.tracking import MlflowTracker

    source = MlflowTracker(f"sqlite:///{db}", create=False)
    experiment, logged = source.runs_under(bench)
    rows = compare(source, logged, experiment)["rows"]
    assert len(rows) == 4 and all(r["delta_vs_baseline"] for r in rows if r["role"] == "controller")


@pytest.mark.slow
def test_cli_bench_done_criterion(cli, tmp_path):
    report = tmp_path / "docs" / "results.md"
    report.parent.mkdir()
    report.write_text("# Results\n\n<!-- metacore-bench:begin -->\n<!-- metacore-bench:end -->\n\n## Other\nkept\n")
    controllers = "hypergrad,static" if "hypergrad" in cli("list", "controllers").stdout else "cosine,static"
    out = cli("bench", "--task", "digits", "--controllers", controllers, "--seeds", "2", "--grid", "lr=1e-3,1e-1",
              "--steps", "100", "--workers", "2", "--report", str(report), "--json", timeout=1200)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["runs"]) == 8
    text = report.read_text()
    assert text.startswith("# Results") and text.rstrip().endswith("kept") and "bench-digits.png" in text
    assert (tmp_path / "docs" / "img" / "bench-digits.png").is_file()
    by_run = cli("compare", "--run", result["parent_run_id"])  # the human table, from the bench parent
    assert by_run.returncode == 0, by_run.stderr
    assert "lr=0.1" in by_run.stdout and "static (baseline)" in by_run.stdout
