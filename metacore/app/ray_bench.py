"""``metacore bench --backend ray``: every unit of a bench is one Ray task with declared resources.

Ray schedules the units (on a local instance or a cluster) and retries a unit whose worker process dies
(``max_retries``). A retried unit does not start over in new MLflow runs: it finds the runs of its earlier attempt
below the bench parent (tag ``metacore.unit``) and continues them like ``metacore run --resume`` — finished children
are kept as they are, unfinished ones continue from their newest intact checkpoint, and a child that died before its
first checkpoint is deleted and run again. So a finished unit is never run twice, and no unit leaves a duplicate
child behind. Ctrl-C cancels every outstanding unit (the running ones mark their runs KILLED).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from metacore.core.errors import UsageError
from metacore.core.store import RunRecord, Tracker

MAX_RETRIES = 3  # a unit whose worker dies is run again this many times at most


def check_request(req: Any) -> None:
    """What ``--backend ray`` needs, checked before the bench writes anything: Ray, a reachable address, resources."""
    from metacore.app.ray_runtime import check_address, require_ray

    if not req.cpus_per_unit > 0:
        raise UsageError(f"--cpus-per-unit must be positive, got {req.cpus_per_unit}")
    if req.gpus_per_unit < 0:
        raise UsageError(f"--gpus-per-unit must be >= 0, got {req.gpus_per_unit}")
    require_ray("--backend ray")
    if req.address:
        check_address(req.address)


def run_units(req: Any, units: list[Any], bench_id: str, on_done: Callable[[Any, dict[str, Any]], None]) -> None:
    """Submit every unit as a Ray task; call ``on_done(unit, result)`` as each finishes (any order)."""
    from metacore.app.ray_runtime import absolute_tracking_uri, is_local_store, ray_session
    from metacore.app.runner import CHECKPOINT_ROOT

    uri = absolute_tracking_uri(units[0].request.tracking_uri) if units else ""
    if req.address and is_local_store(uri):
        print(f"metacore: warning: units on other machines cannot write the local store {uri}; start an "
              "`mlflow server` and pass --tracking-uri http://HOST:PORT", file=sys.stderr)
    units = [replace(u, request=replace(
        u.request, tracking_uri=uri, checkpoint_dir=str(Path(u.request.checkpoint_dir or CHECKPOINT_ROOT).resolve()),
        data_dir=str(Path(u.request.data_dir).resolve()) if u.request.data_dir else None)) for u in units]
    threads = max(1, int(req.cpus_per_unit))
    with ray_session(req.address, "--backend ray") as ray:
        task = ray.remote(_ray_unit).options(num_cpus=req.cpus_per_unit, num_gpus=req.gpus_per_unit,
                                             max_retries=MAX_RETRIES, retry_exceptions=False)
        refs = {task.remote(u, bench_id, threads): u for u in units}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        res = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # retries used up, or cancelled
                        lines = str(exc).strip().splitlines()
                        res = {"index": refs[ref].index, "error": f"{type(exc).__name__}: {lines[0] if lines else ''}"}
                    on_done(refs[ref], res)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref)
            raise


def _ray_unit(unit: Any, bench_id: str, threads: int) -> dict[str, Any]:
    """Ray task: one unit, or the continuation of its earlier attempt. Errors come back as data."""
    try:
        import torch

        torch.set_num_threads(threads)
        from metacore.app.plan import plan_run
        from metacore.app.runner import execute
        from metacore.core.tracking import MlflowTracker

        tracker = MlflowTracker(unit.request.tracking_uri)
        plan = plan_run(unit.request)
        previous = _previous_attempt(tracker, bench_id, unit.index)
        import ray

        node = ray.get_runtime_context().get_node_id()
        tags = {"metacore.bench": bench_id, "metacore.unit": str(unit.index), "metacore.attempt": "1",
                "metacore.ray_node": node}
        if previous:
            attempt = int(previous.tags.get("metacore.attempt", "1")) + 1
            tracker.set_tags(previous.run_id, {"metacore.attempt": str(attempt), "metacore.ray_node": node})
            _drop_unresumable(tracker, previous.run_id)
        summary = execute(plan, tracker.nested(bench_id, tags), resume_parent=previous.run_id if previous else None)
        return {"index": unit.index, "summary": summary}
    except Exception as exc:
        return {"index": unit.index, "error": f"{type(exc).__name__}: {exc}"}


def _previous_attempt(tracker: Tracker, bench_id: str, index: int) -> RunRecord | None:
    """The run parent an earlier attempt of this unit made below the bench parent, if any."""
    found = [c for c in tracker.children(bench_id) if c.tags.get("metacore.unit") == str(index)]
    return found[0] if found else None


def _drop_unresumable(tracker: Tracker, parent_id: str) -> None:
    """Delete the unfinished children of an earlier attempt that have no intact checkpoint to continue from; the
    resumed run then starts them afresh (instead of beside them, which would leave a duplicate)."""
    from metacore.core.checkpoint import is_intact, list_checkpoints

    for child in tracker.children(parent_id):
        if child.status == "FINISHED" and "metacore.result" in child.tags:
            continue
        ckpt_dir = child.tags.get("metacore.checkpoint_dir")
        if not ckpt_dir or not any(is_intact(p) for p in list_checkpoints(ckpt_dir)):
            tracker.delete_run(child.run_id)
