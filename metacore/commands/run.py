"""``metacore run``: a controller and a baseline beside it, logged to MLflow."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from metacore.commands import flags
from metacore.commands.common import report_failures

NAME = "run"


def add_parser(sub: Any) -> None:
    run = sub.add_parser(NAME, help="train with a controller and, beside it, a baseline; log both to MLflow")
    flags.add(run, flags.RUN)


def main(args: argparse.Namespace) -> int:
    from metacore.app.plan import plan_resume, plan_run
    from metacore.app.runner import RunFailed, RunInterrupted, execute
    from metacore.core.errors import UsageError
    from metacore.core.registry import load_registry
    from metacore.core.threads import apply_threads, resolve_threads

    threads = resolve_threads(args.threads)
    registry = load_registry()
    report_failures(registry)
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
    apply_threads(threads)
    for note in plan.notes:
        print(f"metacore: {note}", file=sys.stderr)
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
    except RunFailed as exc:  # the other runs finished; report them, then what failed and how to come back
        _report(exc.summary, threads, args.json, plan.task.primary_metric)
        for run in exc.summary["runs"]:
            if run.get("status") == "FAILED":
                kept = f"newest checkpoint kept: {run['checkpoint']}" if run["checkpoint"] else "no checkpoint yet"
                print(f"metacore: error: {run['error']} ({kept}); {run['fix']}: {exc.summary['resume']}",
                      file=sys.stderr)
        return 2 if exc.bad_input else 1
    finally:
        stop.restore()
    _report(summary, threads, args.json, plan.task.primary_metric)
    return 0


def _report(summary: dict[str, Any], threads: int, as_json: bool, primary: str) -> None:
    summary["threads"] = threads
    if as_json:
        print(json.dumps(summary))
    else:
        print_summary(summary, primary)


def _request(args: argparse.Namespace, registry: Any) -> Any:
    from metacore.app.runner import RunRequest

    fields = flags.request_fields(args, flags.RUN)
    if fields["baseline"] is None:
        fields["baseline"] = registry.task(args.task).obj.default_baseline
    if fields["baseline"] == "none":
        fields["baseline"] = None
    return RunRequest(**fields)


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
        if r.get("status") == "FAILED":
            table.add_row(r["role"], r["controller"], str(r["seed"]), str(r["steps"]), "FAILED", "-", "-", "-",
                          f"{r['wall_s']:.1f}", "-")
            continue
        lr = r["hparams_final"].get("lr")
        table.add_row(r["role"], r["controller"], str(r["seed"]), str(r["steps"]),
                      fmt(r["final"].get(f"val/{primary}")), fmt(r["best"].get(f"val/{primary}")),
                      fmt(r["final"].get(f"test/{primary}")), "-" if lr is None else f"{lr:.3g}",
                      f"{r['wall_s']:.1f}", "yes" if r["diverged"] else "no")
    console.print(table)
    console.print(f"MLflow: experiment [bold]{summary['experiment']}[/], parent run {summary['parent_run_id']}")
    console.print(f"  view with: mlflow ui --backend-store-uri {summary['tracking_uri']}", soft_wrap=True)
