"""``metacore run``: a controller and its baseline, same seed, budget and data order, as child runs of one parent.

:func:`execute` runs a plan that :mod:`metacore.app.plan` validated and built (``plan_run``, ``plan_resume``): the
parent run, each child run (started, or continued from its newest intact checkpoint), signals and failures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from metacore.app.plan import Plan, budget_steps, plan_run
from metacore.app.request import RunRequest
from metacore.core.errors import CheckpointError, TrackingError
from metacore.core.optimizer import DEFAULT as DEFAULT_OPTIMIZER
from metacore.core.optimizer import optimizer_params
from metacore.core.registry import Registry
from metacore.core.store import RunRecord, Tracker, default_tracking_uri
from metacore.core.task import TaskContext, TaskData
from metacore.core.tracking import MlflowTracker

CHECKPOINT_ROOT = Path("mlflow_runs") / "checkpoints"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                             capture_output=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped the command; checkpoints are written and the runs marked KILLED."""

    def __init__(self, parent_run_id: str, tracking_uri: str) -> None:
        super().__init__(f"interrupted; resume with: metacore run --resume {parent_run_id}"
                         + (f" --tracking-uri {tracking_uri}" if tracking_uri != default_tracking_uri() else ""))
        self.parent_run_id = parent_run_id


class RunFailed(Exception):
    """One or more child runs failed (the others ran to the end); ``summary`` is the full JSON summary.

    ``bad_input`` is true when every failure was a refused value or declaration (a :class:`MetacoreError`, exit 2)
    rather than a bug that raised inside a plugin (exit 1).
    """

    def __init__(self, summary: dict[str, Any]) -> None:
        failed = [r for r in summary["runs"] if r.get("status") == "FAILED"]
        super().__init__(summary.get("error", "a run failed"))
        self.summary = summary
        self.bad_input = all(r.get("error_kind") == "input" for r in failed)


def resume_command(parent_id: str, tracking_uri: str) -> str:
    return f"metacore run --resume {parent_id}" + (
        f" --tracking-uri {tracking_uri}" if tracking_uri != default_tracking_uri() else "")


def execute(plan: Plan, tracker: Tracker | None = None, progress: Any = None, *,
            should_stop: Callable[[], bool] | None = None, resume_parent: str | None = None) -> dict[str, Any]:
    """Run every (seed, role) of the plan; return the JSON summary of DESIGN §1.

    With ``resume_parent``, finished children are reported as they are and unfinished ones continue from their
    newest intact checkpoint in the same MLflow runs. A child that fails (its controller raises, or proposes a value
    that is refused) ends FAILED with the message and its checkpoints kept; the other children still run, and then
    :class:`RunFailed` carries the summary.
    """
    req, task = plan.request, plan.task
    tracker = tracker or MlflowTracker(req.tracking_uri)
    should_stop = should_stop or (lambda: False)
    ckpt_root = _checkpoint_root(plan)
    experiment = req.experiment or task.name
    data_cache: dict[int, TaskData] = {}
    if not resume_parent:  # missing or malformed data: exit 2 before any MLflow run exists
        first = TaskContext(plan.preset, dict(plan.options), req.seed, plan.device, plan.data_dir, dict(plan.hparams))
        data_cache[req.seed] = task.load_data(first)
    if resume_parent:
        parent_id = resume_parent
        tracker.reopen(parent_id)
        existing = {(c.tags.get("metacore.seed"), c.tags.get("metacore.role")): c
                    for c in tracker.children(parent_id)}
    else:
        parent_id = _start_parent(plan, tracker, experiment)
        existing = {}
    summary: dict[str, Any] = {"parent_run_id": parent_id, "task": task.name, "preset": plan.preset.name,
                               "experiment": experiment, "tracking_uri": tracker.uri, "runs": []}
    status = "FAILED"
    lost_store: TrackingError | None = None
    try:
        for seed in range(req.seed, req.seed + req.seeds):
            for spec in plan.roles:
                child = existing.get((str(seed), spec.role))
                if child and child.status == "FINISHED" and "metacore.result" in child.tags:
                    summary["runs"].append(json.loads(child.tags["metacore.result"]))
                    continue
                ctx = TaskContext(plan.preset, dict(plan.options), seed, plan.device, plan.data_dir,
                                  dict(plan.hparams))
                if seed not in data_cache:
                    data_cache = {seed: task.load_data(ctx)}  # one seed's data at a time
                summary["runs"].append(_run_one(plan, tracker, experiment, parent_id, ctx, data_cache[seed],
                                                spec.role, spec.name, spec.controller(), spec.config, child,
                                                ckpt_root, progress, should_stop))
        failed = [r for r in summary["runs"] if r.get("status") == "FAILED"]
        if failed:
            summary["error"] = failed[0]["error"]
            summary["resume"] = resume_command(parent_id, tracker.uri)
        status = "FAILED" if failed else "FINISHED"
    except RunInterrupted:
        status = "KILLED"
        raise
    except TrackingError as exc:
        lost_store = exc
        raise TrackingError(f"{exc}; training state and undelivered metrics are in the checkpoints under "
                            f"{ckpt_root}; when the store answers again: {resume_command(parent_id, tracker.uri)}"
                            ) from None
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            tracker.log_dict(parent_id, summary, "summary.json")
            if status == "FINISHED":  # comparison plot PNG on the parent; a plotting failure never fails the run
                from metacore.analysis.plots import log_comparison_plot

                log_comparison_plot(tracker, parent_id, summary, task)
            tracker.end_run(parent_id, status)
        except TrackingError:
            if lost_store is None:
                raise
    if status == "FAILED":
        raise RunFailed(summary)
    return summary


def _start_parent(plan: Plan, tracker: Tracker, experiment: str) -> str:
    req, task = plan.request, plan.task
    baseline = req.baseline or "none"
    return tracker.start_run(
        experiment, f"{req.controller} vs {baseline}",
        tags={"metacore.role": "parent", "metacore.task": task.name, "metacore.controller": req.controller,
              "metacore.baseline": baseline, "metacore.request": json.dumps(asdict(req))},
        params={**_common_params(plan), "controller": req.controller, "baseline": baseline, "seeds": req.seeds,
                "first_seed": req.seed})


def _common_params(plan: Plan) -> dict[str, Any]:
    from metacore import __version__

    return {"task": plan.task.name, "preset": plan.preset.name, "device": plan.device,
            "precision": plan.request.precision, "compile": plan.request.compile,
            "metacore.version": __version__, "git.commit": git_commit(),
            **optimizer_params(plan.optimizer), **{f"option.{k}": v for k, v in plan.options.items()},
            **{f"hparam.{k}": v for k, v in plan.hparams.items()}}


def _run_one(plan: Plan, tracker: Tracker, experiment: str, parent_id: str, ctx: TaskContext, data: TaskData,
             role: str, name: str, controller: Any, config: dict[str, Any], child: RunRecord | None,
             ckpt_root: Path, progress: Any, should_stop: Callable[[], bool]) -> dict[str, Any]:
    """One child run: start (or continue) it, train, record its result on the run itself."""
    from metacore.core.checkpoint import list_checkpoints, load_latest
    from metacore.core.trainer import Trainer, TrainerConfig

    seed, task = ctx.seed, plan.task
    budget = budget_steps(plan, data, plan.hparams)
    if child is None:
        run_id = tracker.start_run(
            experiment, f"{name} seed {seed}" + (" (baseline)" if role == "baseline" else ""), parent_id=parent_id,
            tags={"metacore.role": role, "metacore.controller": name, "metacore.task": task.name,
                  "metacore.seed": str(seed)},
            params={**_common_params(plan), "controller": name, "role": role, "seed": seed, "budget_steps": budget,
                    **{f"controller.{k}": v for k, v in config.items()}, **data.info})
        ckpt_dir = ckpt_root / run_id
        tracker.set_tags(run_id, {"metacore.checkpoint_dir": str(ckpt_dir)})
        payload = None
    else:
        run_id = child.run_id
        ckpt_dir = Path(child.tags.get("metacore.checkpoint_dir", ckpt_root / run_id))
        payload = None
        if list_checkpoints(ckpt_dir):
            path, payload = load_latest(ckpt_dir, map_location=ctx.device)
        if child.tags.get("metacore.error"):
            print(f"metacore: {name} seed {seed} failed last time ({child.tags['metacore.error']}); "
                  f"continuing from {'step ' + str(payload['step']) if payload else 'the start'}", file=sys.stderr)
        tracker.reopen(run_id)
    interval = plan.request.checkpoint_interval
    cfg = TrainerConfig(budget=budget, log_interval=plan.preset.log_interval, eval_interval=plan.preset.eval_interval,
                        checkpoint_interval=plan.preset.checkpoint_interval if interval is None else interval,
                        checkpoint_dir=ckpt_dir, precision=plan.request.precision, compile=plan.request.compile)
    on_log = progress.start(f"{name} seed {seed}", budget) if progress else None
    run_status = "FAILED"
    trainer = None
    try:
        trainer = Trainer(task, controller, ctx, plan.hparams, cfg, data=data, tracker=tracker, run_id=run_id,
                          on_log=on_log, should_stop=should_stop)
        if payload is not None:
            logged = tracker.last_logged_step(run_id)
            pending = [m for m in payload.get("undelivered", []) if m[3] > logged]
            if pending:  # metrics the store did not take before the checkpoint: deliver them now
                tracker.redeliver(run_id, pending)
                logged = max(int(m[3]) for m in pending)
            trainer.restore(payload, logged_until=logged)
            if on_log:
                on_log(trainer.step)
        trainer.advance(budget - trainer.step)
        if not trainer.done:  # stopped by a signal: keep the place, say how to come back
            trainer.save_checkpoint()
            run_status = "KILLED"
            raise RunInterrupted(parent_id, tracker.uri)
        result = trainer.finish()
        run_status = "FINISHED"
    except (KeyboardInterrupt, RunInterrupted):
        run_status = "KILLED"
        raise
    except TrackingError:  # the store, not this run: the command stops (execute says how to resume)
        if trainer is not None and trainer.config.checkpoint_dir:
            trainer.save_checkpoint()  # it holds what the store has not taken
        raise
    except Exception as exc:  # this child fails; the command goes on with the others
        return _failed_entry(plan, tracker, run_id, name, role, seed, trainer, ckpt_dir, exc)
    finally:
        if progress:
            progress.stop()
        if run_status != "FINISHED":
            tracker.end_run(run_id, run_status)
    entry = {"run_id": run_id, "controller": name, "role": role, "seed": seed,
             "optimizer": plan.optimizer.name if plan.optimizer else DEFAULT_OPTIMIZER,
             "optimizer_options": dict(plan.optimizer.config) if plan.optimizer else {}, "steps": result.steps,
             "wall_s": result.wall_s, "final": result.final, "best": result.best,
             "hparams_final": result.hparams_final, "diverged": result.diverged, "rollbacks": result.rollbacks,
             "compute_ratio": result.compute_ratio, "status": "FINISHED"}
    tags = {"metacore.diverged": str(result.diverged).lower(), "metacore.result": json.dumps(entry)}
    if child and child.tags.get("metacore.error"):
        tags["metacore.error"] = ""  # fixed and resumed: the run is no longer failed
    tracker.set_tags(run_id, tags)
    tracker.end_run(run_id, "FINISHED")
    return entry


def _failed_entry(plan: Plan, tracker: Tracker, run_id: str, name: str, role: str, seed: int, trainer: Any,
                  ckpt_dir: Path, exc: BaseException) -> dict[str, Any]:
    """The summary entry of a child that failed, with what to fix and where its newest checkpoint is."""
    from metacore.core.checkpoint import list_checkpoints
    from metacore.core.errors import ControllerFailed, MetacoreError, first_line

    if isinstance(exc, ControllerFailed):
        message, bad_input = str(exc), exc.bad_input
        culprit = f"controller {name!r} (plugin {plan.plugins.get(name, '?')!r})"
    else:
        bad_input = isinstance(exc, MetacoreError)
        detail = str(exc) if bad_input else first_line(exc, with_type=True)
        message = f"{role} run {name!r} seed {seed} failed: {detail}"
        culprit = f"task {plan.task.name!r} (plugin {plan.plugins.get(plan.task.name, '?')!r})"
    checkpoints = list_checkpoints(ckpt_dir)
    entry = {"run_id": run_id, "controller": name, "role": role, "seed": seed,
             "steps": trainer.step if trainer is not None else 0,
             "wall_s": round(trainer.wall_s, 3) if trainer is not None else 0.0, "final": {}, "best": {},
             "hparams_final": {}, "diverged": False, "rollbacks": trainer.rollbacks if trainer is not None else 0,
             "compute_ratio": None,
             "status": "FAILED", "error": message, "error_kind": "input" if bad_input else "plugin",
             "fix": f"fix {culprit}, then resume", "checkpoint": str(checkpoints[-1]) if checkpoints else None}
    try:
        tracker.set_tags(run_id, {"metacore.error": message[:5000], "metacore.result": json.dumps(entry)})
    except Exception:  # the store itself may be what failed; the summary still says it
        pass
    return entry


def _checkpoint_root(plan: Plan) -> Path:
    """The checkpoint root, created and checked for writing before any run starts."""
    root = Path(plan.request.checkpoint_dir) if plan.request.checkpoint_dir else CHECKPOINT_ROOT
    root = root.resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoints in {root}: {exc.strerror or exc}") from None
    return root


def run(request: RunRequest, registry: Registry | None = None, tracker: Tracker | None = None,
        progress: Any = None) -> dict[str, Any]:
    """Validate, then execute. The programmatic twin of ``metacore run``."""
    return execute(plan_run(request, registry), tracker, progress)
