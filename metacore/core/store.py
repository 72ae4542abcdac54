"""The store interface: :class:`Tracker` writes runs and reads them back, over MLflow or in memory
(:mod:`metacore.core.tracking`). The runner, bench, tune and the controllers that replay a run write and read
through it; analysis only reads.

A run read back is a :class:`RunRecord`. Only what metacore itself logged is relied upon (tags ``metacore.role``/
``metacore.controller``/``metacore.task``/``metacore.seed``/``metacore.diverged``, params ``preset``/
``budget_steps``/``hparam.*``/``option.*``/``controller.*``, step-indexed metrics), so runs made by any version of
``metacore run`` or ``metacore bench``, on any machine, compare the same way.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from metacore.core.errors import UsageError

DEFAULT_TRACKING_URI = "sqlite:///mlflow_runs/mlflow.db"
TRAINING_ROLES = ("controller", "baseline")
History = list[tuple[int, float]]


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store URI (``sqlite:///path``), None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


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


def run_record(run_id: str, parent_id: str | None, experiment: str, name: str, status: str, tags: dict[str, str],
               params: dict[str, str], metrics: dict[str, float], start_ms: int, end_ms: int | None) -> RunRecord:
    """A :class:`RunRecord` from what a store holds of a run (role, task, controller, seed from its tags)."""
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


class Tracker:
    """Interface. ``start_run`` returns a run id; metrics are buffered until ``flush`` or ``end_run``.

    :meth:`nested` gives a view of the same store whose top-level runs are started below a given run (a bench
    parent); every method of the interface works the same through it.
    """

    uri: str = ""
    _nest: tuple[str, dict[str, str]] | None = None  # (parent id, tags) of a nested view

    def nested(self, parent_id: str, tags: Mapping[str, str]) -> Tracker:
        """This store, with every run it starts tagged ``tags`` and, if it has no parent, started below
        ``parent_id``. The view shares the store, its buffers and its connection with this tracker."""
        view = copy.copy(self)
        view._nest = (parent_id, dict(tags))
        return view

    # --- writing -----------------------------------------------------------------------------------------------
    def start_run(self, experiment: str, name: str, *, parent_id: str | None = None,
                  tags: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None) -> str:
        if self._nest is not None:
            parent_id = parent_id or self._nest[0]
            tags = {**self._nest[1], **(tags or {})}
        return self._start_run(experiment, name, parent_id=parent_id, tags=dict(tags or {}), params=params or {})

    def _start_run(self, experiment: str, name: str, *, parent_id: str | None, tags: dict[str, str],
                   params: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        raise NotImplementedError

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_dict(self, run_id: str, obj: Any, filename: str) -> None:
        raise NotImplementedError

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        raise NotImplementedError

    def flush(self, run_id: str | None = None) -> None:
        pass

    def undelivered(self, run_id: str) -> list[list]:
        """Metric values logged but not yet in the store, as ``[key, value, timestamp_ms, step]`` (checkpoints keep
        them so that ``--resume`` can deliver them)."""
        return []

    def redeliver(self, run_id: str, items: list) -> None:
        """Log values that :meth:`undelivered` returned (from a checkpoint) with their original steps."""
        by_step: dict[int, dict[str, float]] = {}
        for key, value, _, step in items:
            by_step.setdefault(int(step), {})[key] = float(value)
        for step, metrics in sorted(by_step.items()):
            self.log_metrics(run_id, metrics, step)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        raise NotImplementedError

    def reopen(self, run_id: str) -> None:
        """Mark an interrupted run as running again."""
        raise NotImplementedError

    def delete_run(self, run_id: str) -> None:
        raise NotImplementedError

    # --- reading -----------------------------------------------------------------------------------------------
    def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or None if there is no such run."""
        raise NotImplementedError

    def get(self, run_id: str) -> RunRecord:
        """The run; UsageError if there is no such run."""
        run = self.get_run(run_id)
        if run is None:
            raise UsageError(f"no run {run_id!r} in {self.uri}")
        return run

    def children(self, parent_id: str) -> list[RunRecord]:
        """The runs directly below ``parent_id``."""
        raise NotImplementedError

    def experiment_runs(self, experiment: str) -> list[RunRecord]:
        """Every run of the experiment (UsageError if there is no such experiment)."""
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

    def history(self, run_id: str, key: str) -> History:
        """``(step, value)`` of every value of the metric, in step order (values of one step in the order logged)."""
        raise NotImplementedError

    def metric_keys(self, run_id: str) -> list[str]:
        raise NotImplementedError

    def last_logged_step(self, run_id: str) -> int:
        """The largest step of any metric already stored for the run (-1 if none)."""
        raise NotImplementedError
