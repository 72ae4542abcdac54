"""``metacore bench``: a grid of (task, initial hyperparameters, controller, seed) runs, then a report.

Every grid point runs through the same code path as ``metacore run`` (``plan.plan_run`` then ``runner.execute``),
in a local process pool. One MLflow parent run stands for the whole bench; each ``execute`` makes its own parent
below it (so a grid point looks in MLflow exactly like a ``metacore run``), tagged ``metacore.bench``.

The baseline (the task's default, usually ``static``) runs once per (task, grid point, seed), beside the first
non-baseline controller; the other controllers are paired with it by condition and seed. Concurrent workers write
to one SQLite store: the tracker retries writes that find the database locked, and nothing is buffered across
processes, so no metric is lost (the tests count the steps).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from metacore.app.runner import RunRequest
from metacore.core.errors import UsageError

OPTIMIZER = "optimizer"  # the grid name that sweeps registered optimizers


@dataclass
class BenchRequest:
    tasks: list[str]
    controllers: list[str]
    baseline: str | None = "default"  # "default": each task's default baseline; None: no baseline
    seeds: int = 3
    seed: int = 0
    grid: dict[str, list[str]] = field(default_factory=dict)
    preset: str = "small"
    steps: int | None = None
    epochs: float | None = None
    sets: dict[str, str] = field(default_factory=dict)
    data_dir: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    device: str = "auto"
    workers: int = 1
    backend: str = "local"  # "local": this machine's process pool; "ray": one Ray task per unit
    address: str | None = None  # Ray cluster address (default: a local Ray instance)
    cpus_per_unit: float = 1.0
    gpus_per_unit: float = 0.0
    optimizer: str | None = None  # every run's optimizer (--optimizer); a grid over "optimizer" overrides it


@dataclass
class Unit:
    """One ``execute`` call: one seed of one controller (and the baseline beside it, for the first controller)."""

    index: int
    request: RunRequest
    point: dict[str, str]  # the grid values of this unit

    @property
    def label(self) -> str:
        point = ", ".join(f"{k}={v}" for k, v in self.point.items())
        base = f" + {self.request.baseline}" if self.request.baseline else ""
        return f"{self.request.task}{' ' + point if point else ''}: {self.request.controller}{base} " \
               f"seed {self.request.seed}"


def parse_grid(items: list[str] | None) -> dict[str, list[str]]:
    """``["lr=1e-3,1e-1", "momentum=0.5,0.9"]`` -> ``{"lr": ["1e-3", "1e-1"], "momentum": ["0.5", "0.9"]}``."""
    grid: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        name = name.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name or not vals:
            raise UsageError(f"--grid expects NAME=V1,V2,..., got {item!r}")
        if name in grid:
            raise UsageError(f"--grid {name} given twice")
        grid[name] = vals
    return grid


def plan_bench(req: BenchRequest, registry: Any = None) -> list[Unit]:
    """Every unit of the bench, each validated by ``plan_run`` before anything runs or is written."""
    from metacore.app.plan import plan_run
    from metacore.core.registry import load_registry

    registry = registry or load_registry()
    if not req.tasks:
        raise UsageError("bench needs --task or --tasks")
    if not req.controllers:
        raise UsageError("bench needs --controllers")
    if len(set(req.controllers)) != len(req.controllers):
        raise UsageError(f"--controllers lists a controller twice: {','.join(req.controllers)}")
    if req.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {req.workers}")
    if req.backend not in ("local", "ray"):
        raise UsageError(f"--backend must be local or ray, got {req.backend!r}")
    if req.address and req.backend != "ray":
        raise UsageError("--address needs --backend ray")
    if req.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {req.seeds}")
    clash = sorted(set(req.grid) & set(req.sets))
    if clash:
        raise UsageError(f"{clash[0]} is given both in --grid and --set")
    if req.optimizer and "optimizer" in req.grid:
        raise UsageError("optimizer is given both in --grid and --optimizer")
    units: list[Unit] = []
    names = list(req.grid)
    for task in req.tasks:
        entry = registry.task(task)
        baseline = entry.obj.default_baseline if req.baseline == "default" else req.baseline
        if baseline:
            registry.controller(baseline)
        others = [c for c in req.controllers if c != baseline] or [req.controllers[0]]
        for values in itertools.product(*(req.grid[n] for n in names)):
            point = dict(zip(names, values, strict=True))
            sets = {k: v for k, v in {**req.sets, **point}.items() if k != OPTIMIZER}
            optimizer = point.get(OPTIMIZER, req.optimizer)
            for i, controller in enumerate(others):
                for seed in range(req.seed, req.seed + req.seeds):
                    run_req = RunRequest(
                        task=task, controller=controller,
                        baseline=baseline if i == 0 and controller != baseline else None, preset=req.preset,
                        steps=req.steps, epochs=req.epochs, seed=seed, seeds=1, sets=sets, optimizer=optimizer,
                        data_dir=req.data_dir, tracking_uri=req.tracking_uri,
                        experiment=req.experiment or _default_experiment(req.tasks), device=req.device)
                    plan_run(run_req, registry)  # validation only: bad input stops the bench before it starts
                    units.append(Unit(len(units), run_req, point))
    if req.backend == "ray":
        from metacore.app.ray_bench import check_request

        check_request(req)
    return units


def _default_experiment(tasks: list[str]) -> str:
    return tasks[0] if len(tasks) == 1 else "bench"


def _run_unit(unit: Unit, bench_id: str, threads: int | None) -> dict[str, Any]:
    """Worker: one ``metacore run`` of the unit, below the bench parent. Errors come back as data."""
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        from metacore.app.plan import plan_run
        from metacore.app.runner import execute
        from metacore.core.tracking import MlflowTracker

        tracker = MlflowTracker(unit.request.tracking_uri).nested(bench_id, {"metacore.bench": bench_id})
        summary = execute(plan_run(unit.request), tracker)
        return {"index": unit.index, "summary": summary}
    except Exception as exc:
        return {"index": unit.index, "error": f"{type(exc).__name__}: {exc}"}


def run_bench(req: BenchRequest, units: list[Unit], *, command: str | None = None, report: str | Path | None = None,
              plot_dir: str | Path | None = None, quiet: bool = False, section: str | None = None) -> dict[str, Any]:
    """Run the units (a process pool when ``workers > 1``), then compare and write the report."""
    from metacore import __version__
    from metacore.analysis.compare import compare
    from metacore.analysis.report import build_report
    from metacore.app.plan import resolve_device
    from metacore.app.runner import git_commit
    from metacore.core.tracking import MlflowTracker

    tracker = MlflowTracker(req.tracking_uri)
    uri = tracker.uri
    units = [replace(u, request=replace(u.request, tracking_uri=uri)) for u in units]
    experiment = req.experiment or _default_experiment(req.tasks)
    baseline = units[0].request.baseline or "none"
    bench_id = tracker.start_run(
        experiment, f"bench {','.join(req.tasks)}: {','.join(req.controllers)}",
        tags={"metacore.role": "bench", "metacore.task": ",".join(req.tasks),
              "metacore.controller": ",".join(req.controllers), "metacore.baseline": baseline},
        params={"tasks": ",".join(req.tasks), "controllers": ",".join(req.controllers), "baseline": baseline,
                "seeds": req.seeds, "first_seed": req.seed, "grid": req.grid, "preset": req.preset,
                "steps": req.steps, "epochs": req.epochs, "workers": req.workers, "units": len(units),
                "backend": req.backend,
                "metacore.version": __version__, "git.commit": git_commit(), **{f"set.{k}": v for k, v in
                                                                                 req.sets.items()}})
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        say(f"bench {bench_id}: {len(units)} unit(s), " + (f"Ray {req.address or 'local instance'}"
            if req.backend == "ray" else f"{req.workers} worker(s)"))

        def done(unit: Unit, res: dict[str, Any]) -> None:
            results.append(res)
            _progress(say, unit, res, len(results), len(units))

        if req.backend == "ray":
            from metacore.app.ray_bench import run_units

            run_units(req, units, bench_id, done)
        elif req.workers == 1:
            for unit in units:
                done(unit, _run_unit(unit, bench_id, None))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            threads = max(1, (os.cpu_count() or 1) // req.workers)
            pool = ProcessPoolExecutor(req.workers, mp_context=multiprocessing.get_context("spawn"))
            try:
                futures = {pool.submit(_run_unit, u, bench_id, threads): u for u in units}
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
            except BaseException:
                _stop_pool(pool)
                raise
            pool.shutdown()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            tracker.end_run(bench_id, status)
    results.sort(key=lambda r: r["index"])
    by_index = {u.index: u for u in units}
    runs, failures = [], []
    for res in results:
        unit = by_index[res["index"]]
        if "error" in res:
            failures.append({"unit": unit.label, "error": res["error"]})
            continue
        for item in res["summary"]["runs"]:
            runs.append({**item, "task": unit.request.task, "grid": unit.point,
                         "run_parent_id": res["summary"]["parent_run_id"]})
    wall = time.perf_counter() - start
    out: dict[str, Any] = {"parent_run_id": bench_id, "experiment": experiment, "tracking_uri": uri, "runs": runs,
                           "failures": failures, "wall_s": round(wall, 1)}
    try:
        _, logged = tracker.runs_under(bench_id)
        result = compare(tracker, logged, experiment)
        out["rows"] = result["rows"]
        report_path = Path(report) if report else Path("mlflow_runs") / "reports" / f"bench-{bench_id[:8]}" / \
            "report.md"
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "metacore": __version__,
                "git commit": git_commit(), "device": resolve_device(req.device),
                "CPU cores": os.cpu_count(), "workers": req.workers if req.backend == "local" else
                f"Ray ({req.address or 'local instance'}, {req.cpus_per_unit:g} CPU per unit)",
                "bench wall time": f"{wall:.0f} s", "MLflow": f"experiment `{experiment}`, bench parent run "
                f"`{bench_id}`", "runs": f"{len(runs)} finished, {len(failures)} unit(s) failed"}
        path, plots = build_report(tracker, logged, result, report_path, plot_dir, heading=_heading(req),
                                   command=command, meta=meta, prefix=f"bench-{section}" if section else "bench",
                                   section=section)
        out["report"] = str(path)
        out["plots"] = [str(p) for p in plots]
        tracker.log_dict(bench_id, {k: v for k, v in out.items() if k != "rows"}, "summary.json")
        tracker.log_dict(bench_id, result, "comparison.json")
        for p in [path, *plots]:
            tracker.log_artifact(bench_id, p)
    finally:
        tracker.end_run(bench_id, "FINISHED" if not failures else "FAILED")
    return out


def _stop_pool(pool: Any) -> None:
    """Ctrl-C (or a broken worker): drop the queued units and interrupt the running ones, which then mark their
    runs KILLED, instead of letting the pool start every unit still queued."""
    import signal

    pool.shutdown(wait=False, cancel_futures=True)
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            os.kill(proc.pid, signal.SIGINT)
        except OSError:
            pass


def _heading(req: BenchRequest) -> str:
    preset = f"{req.steps} steps" if req.steps else f"{req.epochs} epochs" if req.epochs else f"{req.preset} preset"
    return f"Bench: {', '.join(req.tasks)} ({preset}), {', '.join(req.controllers)}, {req.seeds} seed(s)"


def _progress(say: Any, unit: Unit, res: dict[str, Any], done: int, total: int) -> None:
    if "error" in res:
        say(f"[{done}/{total}] {unit.label}: FAILED ({res['error']})")
        return
    parts = []
    for r in res["summary"]["runs"]:
        metric = next((f"{k}={v:.4f}" for k, v in r["final"].items() if k.startswith("test/")), "diverged")
        parts.append(f"{r['controller']} {metric} ({r['wall_s']:.1f} s)")
    say(f"[{done}/{total}] {unit.label}: " + "; ".join(parts))
