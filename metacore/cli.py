"""The ``metacore`` command. Thin: parse, build a plugin registry, call the core.

No torch, mlflow, transformers or stable-baselines3 import at module level, so ``--help`` and ``list`` are fast.
Exit codes: 0 ok, 2 bad input (one line on stderr), 1 unexpected failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from metacore.core.errors import MetacoreError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every bad input is one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from metacore import __version__

    parser = _Parser(prog="metacore", description="Tune hyperparameters while a model trains; compare with a "
                     "static baseline in MLflow.")
    parser.add_argument("--version", action="version", version=f"metacore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="train with a controller and, beside it, a baseline; log both to MLflow")
    run.add_argument("--task", required=True, help="a registered task (metacore list tasks)")
    run.add_argument("--controller", required=True, help="a registered controller; static keeps the initial values")
    run.add_argument("--baseline", default=None, help="controller run beside it (default: the task's, usually "
                     "static); 'none' for no baseline")
    run.add_argument("--preset", default="small", help="task scale: full, small or smoke (default small)")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="budget in optimizer steps (overrides the preset)")
    budget.add_argument("--epochs", type=float, help="budget in epochs (overrides the preset)")
    run.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    run.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", dest="sets",
                     help="initial hyperparameter or task option, e.g. --set lr=0.1 (repeatable)")
    run.add_argument("--controller-set", action="append", metavar="KEY=VALUE", dest="controller_sets",
                     help="controller option, e.g. --controller-set hyper_lr=1e-3 (repeatable)")
    run.add_argument("--data-dir", help="local data root (also METACORE_DATA_DIR)")
    run.add_argument("--tracking-uri", help="MLflow store (default sqlite:///mlflow_runs/mlflow.db; "
                     "also MLFLOW_TRACKING_URI)")
    run.add_argument("--experiment", help="MLflow experiment (default: the task name)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    run.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints (default: the preset's)")
    run.add_argument("--checkpoint-dir", help="where checkpoints go (default mlflow_runs/checkpoints/<run_id>/)")
    run.add_argument("--json", action="store_true", help="print one JSON summary on stdout and nothing else")

    lst = sub.add_parser("list", help="registered tasks and controllers, and where each came from")
    lst.add_argument("what", nargs="?", choices=["tasks", "controllers"], help="only tasks or only controllers")
    lst.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 0
        return {"run": cmd_run, "list": cmd_list}[args.command](args)
    except MetacoreError as exc:
        print(f"metacore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metacore: interrupted", file=sys.stderr)
        return 130


def _report_failures(failures: dict[str, str]) -> None:
    for name, reason in failures.items():
        print(f"metacore: warning: plugin {name!r} failed to load and was skipped ({reason})", file=sys.stderr)


def cmd_list(args: argparse.Namespace) -> int:
    from metacore.core.registry import load_registry

    registry = load_registry()
    _report_failures(registry.failures)
    out: dict[str, Any] = {}
    if args.what in (None, "tasks"):
        out["tasks"] = []
        for entry in registry.tasks.values():
            task = entry.obj()
            out["tasks"].append({
                "name": entry.name, "description": entry.description, "plugin": entry.plugin,
                "distribution": entry.distribution, "presets": list(task.presets()),
                "hparams": task.hparam_space().defaults(),
                "options": {k: s.default for k, s in task.option_specs().items()},
                "primary_metric": task.primary_metric})
    if args.what in (None, "controllers"):
        out["controllers"] = [{"name": e.name, "description": e.description, "plugin": e.plugin,
                               "distribution": e.distribution,
                               "options": {k: s.default for k, s in e.obj.options.items()}}
                              for e in registry.controllers.values()]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for kind in ("tasks", "controllers"):
        if kind not in out:
            continue
        print(f"{kind}:")
        for item in out[kind]:
            extra = f"  presets: {', '.join(item['presets'])}" if kind == "tasks" else ""
            print(f"  {item['name']:<16} {item['description']}")
            print(f"  {'':<16} from {item['plugin']} ({item['distribution'] or 'unknown distribution'}){extra}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from metacore.core.options import parse_assignments
    from metacore.core.registry import load_registry
    from metacore.core.runner import RunRequest, execute, plan_run

    registry = load_registry()
    _report_failures(registry.failures)
    baseline = args.baseline
    if baseline is None:
        entry = registry.task(args.task)
        baseline = entry.obj.default_baseline
    request = RunRequest(
        task=args.task, controller=args.controller, baseline=None if baseline == "none" else baseline,
        preset=args.preset, steps=args.steps, epochs=args.epochs, seed=args.seed, seeds=args.seeds,
        sets=parse_assignments(args.sets, "--set"),
        controller_sets=parse_assignments(args.controller_sets, "--controller-set"),
        data_dir=args.data_dir, tracking_uri=args.tracking_uri, experiment=args.experiment, device=args.device,
        checkpoint_interval=args.checkpoint_interval, checkpoint_dir=args.checkpoint_dir)
    plan = plan_run(request, registry)
    progress = None
    if not args.json:
        from metacore.core.progress import RunProgress

        progress = RunProgress()
    summary = execute(plan, progress=progress)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary, plan.task.primary_metric)
    return 0


def print_summary(summary: dict[str, Any], primary: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['task']} ({summary['preset']}): controller vs baseline")
    for col in ("role", "controller", "seed", "steps", f"val/{primary}", f"best val/{primary}",
                f"test/{primary}", "final lr", "wall s", "diverged"):
        table.add_column(col)
    for r in summary["runs"]:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lr = r["hparams_final"].get("lr")
        table.add_row(r["role"], r["controller"], str(r["seed"]), str(r["steps"]), fmt(r["final"].get(f"val/{primary}")),
                      fmt(r["best"].get(f"val/{primary}")), fmt(r["final"].get(f"test/{primary}")),
                      "-" if lr is None else f"{lr:.3g}", f"{r['wall_s']:.1f}", "yes" if r["diverged"] else "no")
    console = Console()
    console.print(table)
    uri = summary["tracking_uri"]
    console.print(f"MLflow: experiment [bold]{summary['experiment']}[/], parent run {summary['parent_run_id']}")
    console.print(f"  view with: mlflow ui --backend-store-uri {uri}", soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
