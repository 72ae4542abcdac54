"""Tracking: MLflow behind a small interface, and an in-memory tracker for tests and the gym environment.

Metrics are buffered per run and written with ``log_batch`` (at most 1000 per call), never one SQLite transaction
per step. Runs are addressed by id through ``MlflowClient``, so there is no global "active run" to leak between the
controller and baseline runs of one command. A busy or absent store is handled by :mod:`metacore.core.store_link`:
training goes on, undelivered metrics stay buffered (and travel in checkpoints), writes a run needs retry, then stop
with one clear message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from metacore.core.errors import TrackingError, first_line
from metacore.core.store_link import StoreLink, quick_http_failures

DEFAULT_TRACKING_URI = "sqlite:///mlflow_runs/mlflow.db"
FLUSH_EVERY = 500  # buffered metric values per run before a write
RETRY_EVERY_S = 10.0  # while the store is away, how often a buffered flush tries again


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store URI (``sqlite:///path``), None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


class Tracker:
    """Interface. ``start_run`` returns a run id; metrics are buffered until ``flush`` or ``end_run``."""

    uri: str = ""

    def start_run(self, experiment: str, name: str, *, parent_id: str | None = None,
                  tags: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None) -> str:
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

    # --- what ``--resume`` needs -------------------------------------------------------------------------------
    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """``{"run_id", "status", "tags", "experiment"}`` or None if there is no such run."""
        raise NotImplementedError

    def children(self, parent_id: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def last_logged_step(self, run_id: str) -> int:
        """The largest step of any metric already stored for the run (-1 if none)."""
        raise NotImplementedError

    def reopen(self, run_id: str) -> None:
        """Mark an interrupted run as running again."""
        raise NotImplementedError


def _param_str(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)[:500]
    text = value if isinstance(value, str) else str(value)
    return text[:500]


class MemoryTracker(Tracker):
    """Keeps everything in dictionaries; what tests inspect."""

    uri = "memory:"

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}

    def start_run(self, experiment, name, *, parent_id=None, tags=None, params=None) -> str:
        run_id = uuid.uuid4().hex
        self.runs[run_id] = {"experiment": experiment, "name": name, "parent_id": parent_id, "tags": dict(tags or {}),
                             "params": {}, "metrics": {}, "artifacts": {}, "status": "RUNNING"}
        self.log_params(run_id, params or {})
        return run_id

    def log_params(self, run_id, params) -> None:
        self.runs[run_id]["params"].update({k: _param_str(v) for k, v in params.items()})

    def set_tags(self, run_id, tags) -> None:
        self.runs[run_id]["tags"].update(tags)

    def log_metrics(self, run_id, metrics, step) -> None:
        for key, value in metrics.items():
            self.runs[run_id]["metrics"].setdefault(key, []).append((int(step), float(value)))

    def log_dict(self, run_id, obj, filename) -> None:
        self.runs[run_id]["artifacts"][filename] = json.loads(json.dumps(obj))

    def log_artifact(self, run_id, path) -> None:
        self.runs[run_id]["artifacts"][Path(path).name] = str(path)

    def end_run(self, run_id, status="FINISHED") -> None:
        self.runs[run_id]["status"] = status

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return self.runs[run_id]["metrics"].get(key, [])

    def get_run(self, run_id):
        run = self.runs.get(run_id)
        if run is None:
            return None
        return {"run_id": run_id, "status": run["status"], "tags": dict(run["tags"]), "experiment": run["experiment"]}

    def children(self, parent_id):
        return [self.get_run(rid) for rid, run in self.runs.items() if run["parent_id"] == parent_id]

    def last_logged_step(self, run_id):
        steps = [s for values in self.runs[run_id]["metrics"].values() for s, _ in values]
        return max(steps, default=-1)

    def reopen(self, run_id):
        self.runs[run_id]["status"] = "RUNNING"


class MlflowTracker(Tracker):
    """MLflow through ``MlflowClient``; a local SQLite store by default (``sqlite:///mlflow_runs/mlflow.db``)."""

    def __init__(self, uri: str | None = None, artifact_root: str | Path | None = None) -> None:
        self.uri = uri or default_tracking_uri()
        self._artifact_root = Path(artifact_root) if artifact_root else None
        self._buffers: dict[str, list[Any]] = {}
        self._experiments: dict[str, str] = {}
        self._prepare_local_store()
        # with a tracking server MLflow prints "View run ... at: URL" on stdout when a run ends, which would break
        # --json (one JSON object on stdout and nothing else)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.link = StoreLink(self.uri)
        self._last_try = 0.0
        if self.link.remote:
            quick_http_failures()
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "creating tables" chatter on stderr
        logging.getLogger("alembic").setLevel(logging.WARNING)
        try:
            from mlflow.tracking import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets its own level on import
            with self._store_lock():  # two processes creating one new SQLite store would race its migrations
                self.client = MlflowClient(tracking_uri=self.uri)
                self.client.search_experiments(max_results=1)  # opens (and migrates) the store now, not mid-run
        except Exception as exc:
            raise TrackingError(f"cannot open the MLflow store {self.uri}: {first_line(exc)}") from None

    @contextlib.contextmanager
    def _store_lock(self):
        """An exclusive lock file beside a local SQLite store while it is opened (no-op for other stores)."""
        db = sqlite_path(self.uri)
        if db is None:
            yield
            return
        import fcntl

        lock_path = db.with_suffix(".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _prepare_local_store(self) -> None:
        """Create the folder of a local SQLite store and check it is writable, so a bad location fails early."""
        db = sqlite_path(self.uri)
        if db is None:
            return
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=db.parent, prefix=".write-test-"):
                pass
            if db.exists() and not os.access(db, os.W_OK):
                raise PermissionError(f"{db} is read-only")
        except OSError as exc:
            raise TrackingError(f"cannot write the MLflow store {self.uri}: {first_line(exc)}") from None
        if self._artifact_root is None:
            self._artifact_root = db.parent / "artifacts"

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = (self._artifact_root / name).resolve().as_uri() if self._artifact_root else None
                try:
                    exp_id = self.link.call(self.client.create_experiment, name, artifact_location=location)
                except Exception:  # created meanwhile by a concurrent process
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
            self._experiments[name] = exp_id
        return self._experiments[name]

    def start_run(self, experiment, name, *, parent_id=None, tags=None, params=None) -> str:
        try:
            all_tags = dict(tags or {})
            if parent_id:
                all_tags["mlflow.parentRunId"] = parent_id
            run = self.link.call(self.client.create_run, self._experiment_id(experiment), tags=all_tags, run_name=name)
        except Exception as exc:
            raise TrackingError(f"cannot create a run in {self.uri}: {first_line(exc)}") from None
        run_id = run.info.run_id
        self._buffers[run_id] = []
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id, params) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.link.call(self.client.log_batch, run_id, params=items[i : i + 100])

    def set_tags(self, run_id, tags) -> None:
        from mlflow.entities import RunTag

        self.link.call(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id, metrics, step) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        buffer = self._buffers.setdefault(run_id, [])
        buffer.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(buffer) >= FLUSH_EVERY:
            self.flush(run_id)

    def flush(self, run_id=None, wait: bool = False) -> None:
        """Write buffered metrics. If the store is away they stay buffered (tried again at most every
        ``RETRY_EVERY_S``) unless ``wait``: then retry until the link gives up (a TrackingError)."""
        if not wait and self.link.down_since is not None and time.monotonic() - self._last_try < RETRY_EVERY_S:
            return
        self._last_try = time.monotonic()
        for rid in [run_id] if run_id else list(self._buffers):
            buffer = self._buffers.get(rid) or []
            while buffer:
                chunk = buffer[:1000]
                if wait:
                    self.link.call(self.client.log_batch, rid, metrics=chunk)
                elif not self.link.try_call(self.client.log_batch, rid, metrics=chunk):
                    return
                del buffer[: len(chunk)]

    def undelivered(self, run_id):
        return [[m.key, m.value, m.timestamp, m.step] for m in self._buffers.get(run_id) or []]

    def redeliver(self, run_id, items):
        from mlflow.entities import Metric

        self._buffers.setdefault(run_id, []).extend(Metric(k, float(v), int(t), int(s)) for k, v, t, s in items)

    def log_dict(self, run_id, obj, filename) -> None:
        self.link.call(self.client.log_dict, run_id, obj, filename)

    def log_artifact(self, run_id, path) -> None:
        self.link.call(self.client.log_artifact, run_id, str(path))

    def end_run(self, run_id, status="FINISHED") -> None:
        self.flush(run_id, wait=True)
        self.link.call(self.client.set_terminated, run_id, status=status)
        self._buffers.pop(run_id, None)

    def get_run(self, run_id):
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return None
        exp = self.client.get_experiment(run.info.experiment_id)
        return {"run_id": run_id, "status": run.info.status, "tags": dict(run.data.tags), "experiment": exp.name}

    def children(self, parent_id):
        parent = self.client.get_run(parent_id)
        found = self.client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                        max_results=10000)
        return [{"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags)} for r in found]

    def last_logged_step(self, run_id):
        run = self.client.get_run(run_id)
        steps = [m.step for key in run.data.metrics for m in self.client.get_metric_history(run_id, key)]
        return max(steps, default=-1)

    def reopen(self, run_id):
        self.link.call(self.client.update_run, run_id, status="RUNNING")
        self._buffers.setdefault(run_id, [])


