"""``metacore run``: a controller and a baseline beside it, logged to MLflow."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from metacore.commands.common import report_failures

NAME = "run"


def add_parser(sub: Any) -> None:
    run = sub.add_parser(NAME, help="train with a controller and, beside it, a baseline; log both to MLflow")
    run.add_argument("--task", help="a registered task (metacore list tasks); required unless --resume")
    run.add_argument("--controller", help="a registered controller; static keeps the initial values; required "
                     "unless --resume")
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
    run.add_argument("--precision", default="auto", choices=("auto", "fp32"),
                     help="auto: bf16 autocast on CUDA for tasks that declare it safe (default); fp32: never")
    run.add_argument("--compile", action="store_true", help="torch.compile the model for training (GPU fast path)")
    run.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints (default: the preset's)")
    run.add_argument("--checkpoint-dir", help="where checkpoints go (default mlflow_runs/checkpoints/<run_id>/)")
    run.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run (its parent run id) from its "
                     "newest intact checkpoints, with its original options")
    run.add_argument("--json", action="store_true", help="print one JSON summary on stdout and nothing else")



def main(args: argparse.Namespace) -> int:
    from metacore.app.runner import RunInterrupted, execute, plan_resume, plan_run
    from metacore.core.errors import UsageError
    from metacore.core.registry import load_registry

    registry = load_registry()
    report_failures(registry.failures)
    tracker = None
    if args.resume:
        from metacore.core.tracking import MlflowTracker

        tracker = MlflowTracker(args.tracking_uri)
        plan = plan_resume(args.resume, tracker, registry, device=None if args.device == "auto" else args.device)
    else:
        missing = [flag for flag, value in (("--task", args.task), ("--controller", args.controller)) if not value]
        if missing:
            raise UsageError(f"metacore run: the following arguments are required: {', '.join(missing)}")
        plan = plan_run(_request(args, registry), registry)
    progress = None
    if not args.json:
        from metacore.app.progress import RunProgress

        progress = RunProgress()
    stop = _StopOnSignal()
    try:
        summary = execute(plan, tracker, progress=progress, should_stop=stop, resume_parent=args.resume)
    except RunInterrupted as exc:
        print(f"metacore: {exc}", file=sys.stderr)
        return 130
    finally:
        stop.restore()
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary, plan.task.primary_metric)
    return 0


def _request(args: argparse.Namespace, registry: Any) -> Any:
    from metacore.app.runner import RunRequest
    from metacore.core.options import parse_assignments

    baseline = args.baseline
    if baseline is None:
        baseline = registry.task(args.task).obj.default_baseline
    return RunRequest(
        task=args.task, controller=args.controller, baseline=None if baseline == "none" else baseline,
        preset=args.preset, steps=args.steps, epochs=args.epochs, seed=args.seed, seeds=args.seeds,
        sets=parse_assignments(args.sets, "--set"),
        controller_sets=parse_assignments(args.controller_sets, "--controller-set"),
        data_dir=args.data_dir, tracking_uri=args.tracking_uri, experiment=args.experiment, device=args.device,
        checkpoint_interval=args.checkpoint_interval, checkpoint_dir=args.checkpoint_dir,
        precision=args.precision, compile=args.compile)


class _StopOnSignal:
    """SIGINT/SIGTERM ask the trainer to stop at the next step boundary (a second one interrupts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nmetacore: stopping after this step and writing a checkpoint (again to abort)", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def print_summary(summary: dict[str, Any], primary: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 110)
    table = Table(title=f"{summary['task']} ({summary['preset']}): {primary}, controller vs baseline")
    for col in ("role", "controller", "seed", "steps", "final val", "best val", "test", "final lr", "wall s",
                "diverged"):
        table.add_column(col, no_wrap=True)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in summary["runs"]:
        lr = r["hparams_final"].get("lr")
        table.add_row(r["role"], r["controller"], str(r["seed"]), str(r["steps"]),
                      fmt(r["final"].get(f"val/{primary}")), fmt(r["best"].get(f"val/{primary}")),
                      fmt(r["final"].get(f"test/{primary}")), "-" if lr is None else f"{lr:.3g}",
                      f"{r['wall_s']:.1f}", "yes" if r["diverged"] else "no")
    console.print(table)
    console.print(f"MLflow: experiment [bold]{summary['experiment']}[/], parent run {summary['parent_run_id']}")
    console.print(f"  view with: mlflow ui --backend-store-uri {summary['tracking_uri']}", soft_wrap=True)
