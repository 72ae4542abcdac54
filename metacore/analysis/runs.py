"""Read runs back: from an MLflow store (``MlflowRunSource``) or from the in-memory tracker (``MemoryRunSource``).

Only what metacore itself logged is relied upon (tags ``metacore.role``/``metacore.controller``/``metacore.task``/
``metacore.seed``/``metacore.diverged``, params ``preset``/``budget_steps``/``hparam.*``/``option.*``/
``controller.*``, step-indexed metrics), so runs made by any version of ``metacore run`` or ``metacore bench``, on
any machine, compare the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacore.core.errors import TrackingError, UsageError, first_line
from metacore.core.tracking import sqlite_path

TRAINING_ROLES = ("controller", "baseline")
History = list[tuple[int, float]]


@dataclass
class RunRecord:
    """One training run (role controller or baseline), or a parent run, as logged."""

    run_id: str
    parent_id: str | None
    experiment: str
    name: str
    status: str
    role: str
    task: str
    controller: str
    seed: int | None
    diverged: bool
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of each key
    tags: dict[str, str] = field(default_factory=dict)
    start_ms: int = 0
    end_ms: int | None = None
    wall_s: float | None = None  # training time from the parent's summary.json, else the run's duration

    @property
    def is_training(self) -> bool:
        return self.role in TRAINING_ROLES

    def config_key(self) -> tuple:
        """What must match for two runs to be the same experiment condition (seed aside): task, preset, budget,
        initial hyperparameters, task options, and the optimizer with its options (``default``: the task's own, also
        for runs logged before optimizers were plugins)."""
        keep = sorted((k, v) for k, v in self.params.items()
                      if k.startswith(("hparam.", "option.", "optimizer.")) and k != "optimizer.lr_free")
        keep.append(("optimizer", self.params.get("optimizer", "default")))
        return (self.task, self.params.get("preset", ""), self.params.get("budget_steps", ""), tuple(keep))


def _record(run_id: str, parent_id: str | None, experiment: str, name: str, status: str, tags: dict[str, str],
            params: dict[str, str], metrics: dict[str, float], start_ms: int, end_ms: int | None) -> RunRecord:
    seed = tags.get("metacore.seed", params.get("seed"))
    try:
        seed_int = int(seed) if seed is not None else None
    except ValueError:
        seed_int = None
    wall = (end_ms - start_ms) / 1000.0 if end_ms and start_ms else None
    return RunRecord(run_id=run_id, parent_id=parent_id, experiment=experiment, name=name, status=status,
                     role=tags.get("metacore.role", ""), task=tags.get("metacore.task", params.get("task", "")),
                     controller=tags.get("metacore.controller", params.get("controller", "")), seed=seed_int,
                     diverged=tags.get("metacore.diverged", "false").lower() == "true", params=params,
                     metrics=metrics, tags=tags, start_ms=start_ms, end_ms=end_ms, wall_s=wall)


class RunSource:
    """Interface: the runs of an experiment or below a parent, and metric histories."""

    def experiment_runs(self, experiment: str) -> list[RunRecord]:
        raise NotImplementedError

    def runs_under(self, parent_id: str) -> tuple[str, list[RunRecord]]:
        """The experiment of ``parent_id`` and every run below it (children, grandchildren, ...)."""
        parent = self.get(parent_id)
        runs = self.experiment_runs(parent.experiment)
        children: dict[str, list[RunRecord]] = {}
        for r in runs:
            if r.parent_id:
                children.setdefault(r.parent_id, []).append(r)
        out, todo = [], [parent_id]
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child.run_id)
        return parent.experiment, out

    def get(self, run_id: str) -> RunRecord:
        raise NotImplementedError

    def history(self, run_id: str, key: str) -> History:
        raise NotImplementedError

    def metric_keys(self, run_id: str) -> list[str]:
        raise NotImplementedError


class MlflowRunSource(RunSource):
    def __init__(self, uri: str | None = None, client: Any = None) -> None:
        from metacore.core.tracking import default_tracking_uri

        self.uri = uri or default_tracking_uri()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars on stderr
        if client is None:
            self._check_local_store()
            import logging

            logging.getLogger("mlflow").setLevel(logging.WARNING)
            logging.getLogger("alembic").setLevel(logging.WARNING)
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=self.uri)
                client.search_experiments(max_results=1)
            except Exception as exc:
                raise TrackingError(f"cannot open the MLflow store {self.uri}: {first_line(exc)}") from None
        self.client = client
        self._summaries: dict[str, dict | None] = {}

    def _check_local_store(self) -> None:
        """Reading must not create an empty store where the user mistyped a path."""
        db = sqlite_path(self.uri)
        if db is not None:
            if not db.is_file():
                raise UsageError(f"no MLflow store at {db} (run `metacore run` first, or pass --tracking-uri)")

    def _convert(self, run: Any, experiment: str) -> RunRecord:
        info, data = run.info, run.data
        return _record(info.run_id, data.tags.get("mlflow.parentRunId"), experiment, info.run_name or "",
                       info.status, dict(data.tags), dict(data.params), dict(data.metrics), info.start_time or 0,
                       info.end_time)

    def experiment_runs(self, experiment: str) -> list[RunRecord]:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            known = sorted(e.name for e in self.client.search_experiments())
            raise UsageError(f"no experiment {experiment!r} in {self.uri} (known: {', '.join(known) or 'none'})")
        runs, token = [], None
        while True:
            page = self.client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
            runs.extend(self._convert(r, experiment) for r in page)
            token = page.token
            if not token:
                break
        self._attach_wall_times(runs)
        return runs

    def get(self, run_id: str) -> RunRecord:
        try:
            run = self.client.get_run(run_id)
        except Exception:
            raise UsageError(f"no run {run_id!r} in {self.uri}") from None
        exp = self.client.get_experiment(run.info.experiment_id)
        return self._convert(run, exp.name)

    def history(self, run_id: str, key: str) -> History:
        return sorted((int(m.step), float(m.value)) for m in self.client.get_metric_history(run_id, key))

    def metric_keys(self, run_id: str) -> list[str]:
        return list(self.client.get_run(run_id).data.metrics)

    def parent_summary(self, parent_id: str) -> dict | None:
        """The ``summary.json`` artifact that ``metacore run`` leaves on its parent (None where absent)."""
        if parent_id not in self._summaries:
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = self.client.download_artifacts(parent_id, "summary.json", tmp)
                    self._summaries[parent_id] = json.loads(Path(path).read_text())
            except Exception:
                self._summaries[parent_id] = None
        return self._summaries[parent_id]

    def _attach_wall_times(self, runs: list[RunRecord]) -> None:
        """Training wall time as the trainer measured it (the summary), not the run's duration with data loading."""
        by_id = {r.run_id: r for r in runs}
        for parent_id in {r.parent_id for r in runs if r.is_training and r.parent_id}:
            summary = self.parent_summary(parent_id)
            for item in (summary or {}).get("runs", []):
                run = by_id.get(item.get("run_id"))
                if run is not None and item.get("wall_s") is not None:
                    run.wall_s = float(item["wall_s"])


class MemoryRunSource(RunSource):
    """The same view over :class:`metacore.core.tracking.MemoryTracker` (tests, the runner's plot hook)."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def _convert(self, run_id: str) -> RunRecord:
        r = self.tracker.runs[run_id]
        latest = {k: sorted(v)[-1][1] for k, v in r["metrics"].items() if v}
        return _record(run_id, r.get("parent_id"), r["experiment"], r["name"],
                       "FINISHED" if r["status"] in ("FINISHED", "RUNNING") else r["status"], dict(r["tags"]),
                       dict(r["params"]), latest, 0, None)

    def experiment_runs(self, experiment: str) -> list[RunRecord]:
        return [self._convert(rid) for rid, r in self.tracker.runs.items() if r["experiment"] == experiment]

    def get(self, run_id: str) -> RunRecord:
        if run_id not in self.tracker.runs:
            raise UsageError(f"no run {run_id!r}")
        return self._convert(run_id)

    def history(self, run_id: str, key: str) -> History:
        return sorted(self.tracker.runs[run_id]["metrics"].get(key, []))

    def metric_keys(self, run_id: str) -> list[str]:
        return list(self.tracker.runs[run_id]["metrics"])


def source_for_tracker(tracker: Any) -> RunSource | None:
    """A run source reading what ``tracker`` wrote, or None for a tracker it does not know."""
    from metacore.core.tracking import MemoryTracker, MlflowTracker

    inner = getattr(tracker, "inner", tracker)  # a wrapping tracker (bench) exposes the one it wraps
    if isinstance(inner, MlflowTracker):
        return MlflowRunSource(inner.uri, client=inner.client)
    if isinstance(inner, MemoryTracker):
        return MemoryRunSource(inner)
    return None


