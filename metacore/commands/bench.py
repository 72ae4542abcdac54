"""``metacore bench``: a grid of runs (tasks x initial hyperparameters x controllers x seeds), then a report."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from typing import Any

from metacore.commands import flags

NAME = "bench"


def add_parser(sub: Any) -> None:
    b = sub.add_parser(NAME, help="run a grid of controllers, seeds and initial hyperparameters; write a report")
    tasks = b.add_mutually_exclusive_group(required=True)
    tasks.add_argument("--task", help="one registered task")
    tasks.add_argument("--tasks", help="comma-separated tasks, e.g. cifar10,imdb,electricity")
    b.add_argument("--controllers", required=True, help="comma-separated controllers, e.g. hypergrad,static")
    b.add_argument("--baseline", default="default", help="the baseline each controller is paired with "
                   "(default: the task's, usually static; run once per grid point and seed); 'none' for none")
    flags.add(b, [flags.SEEDS.but(default=3), flags.SEED])
    b.add_argument("--grid", action="append", metavar="NAME=V1,V2,...",
                   help="initial hyperparameter (or task option) values to sweep; repeat for a product grid; "
                   "optimizer=default,prodigy,... sweeps registered optimizers")
    flags.add(b, [flags.OPTIMIZER.but(help="a registered optimizer for every run (default: each task's own)"),
                  flags.SET.but(help="fixed initial hyperparameter or task option for every run (repeatable)"),
                  flags.PRESET, flags.STEPS, flags.EPOCHS])
    b.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    b.add_argument("--backend", default="local", help="local: a process pool on this machine (default); ray: one "
                   "Ray task per unit, on a local Ray instance or the cluster at --address")
    flags.add(b, [flags.ADDRESS, flags.CPUS, flags.GPUS])
    b.add_argument("--report", metavar="PATH", help="markdown report (default mlflow_runs/reports/bench-<id>/"
                   "report.md); an existing file with the bench markers keeps everything outside them")
    b.add_argument("--section", metavar="NAME", help="write between the markers of this named section of --report "
                   "(several benches in one file); also prefixes the plot names")
    b.add_argument("--plot-dir", metavar="DIR", help="where the report's PNGs go (default: img/ beside the report)")
    flags.add(b, [flags.DATA_DIR, flags.TRACKING_URI,
                  flags.EXPERIMENT.but(help="MLflow experiment (default: the task name; 'bench' for several tasks)"),
                  flags.DEVICE, flags.JSON])


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(args: argparse.Namespace) -> int:
    from metacore.app.bench import BenchRequest, parse_grid, plan_bench, run_bench
    from metacore.commands.common import report_failures
    from metacore.core.errors import UsageError
    from metacore.core.options import parse_assignments
    from metacore.core.registry import load_registry

    if args.section and not re.fullmatch(r"[A-Za-z0-9_-]+", args.section):
        raise UsageError(f"--section takes letters, digits, '-' and '_', got {args.section!r}")
    registry = load_registry()
    report_failures(registry)
    req = BenchRequest(
        tasks=_names(args.tasks) if args.tasks else [args.task], controllers=_names(args.controllers),
        baseline=None if args.baseline == "none" else args.baseline, seeds=args.seeds, seed=args.seed,
        grid=parse_grid(args.grid), preset=args.preset, steps=args.steps, epochs=args.epochs,
        sets=parse_assignments(args.sets, "--set"), data_dir=args.data_dir, tracking_uri=args.tracking_uri,
        experiment=args.experiment, device=args.device, workers=args.workers, optimizer=args.optimizer,
        backend=args.backend, address=args.address, cpus_per_unit=args.cpus_per_unit, gpus_per_unit=args.gpus_per_unit)
    units = plan_bench(req, registry)
    command = "metacore " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == [NAME] else None
    out = run_bench(req, units, command=command, report=args.report, plot_dir=args.plot_dir, quiet=args.json,
                    section=args.section)
    if args.json:
        print(json.dumps(out))
    else:
        from metacore.commands.compare import print_table

        print_table({"experiment": out["experiment"], "split": "test", "rows": out.get("rows", []),
                     "primary_metric": ",".join(sorted({r["metric"].split("/", 1)[-1] for r in out.get("rows", [])}))})
        print(f"report: {out.get('report')}")
        print(f"MLflow: experiment {out['experiment']}, bench parent run {out['parent_run_id']}")
    for f in out["failures"]:
        print(f"metacore: error: {f['unit']}: {f['error']}", file=sys.stderr)
    return 1 if out["failures"] else 0
