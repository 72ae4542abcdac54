"""The two stores behind the :class:`~metacore.core.store.Tracker` interface: MLflow (``MlflowTracker``) and memory
(``MemoryTracker``, for tests and the gym environment). Each writes runs and reads them back.

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
from typing import Any

from metacore.core.errors import TrackingError, UsageError, first_line
from metacore.core.store import RunRecord, Tracker, default_tracking_uri, run_record, sqlite_path
from metacore.core.store_link import StoreLink, quick_http_failures

FLUSH_EVERY = 500  # buffered metric values per run before a write
RETRY_EVERY_S = 10.0  # while the store is away, how often a buffered flush tries again


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

    def _start_run(self, experiment, name, *, parent_id, tags, params) -> str:
        run_id = uuid.uuid4().hex
        self.runs[run_id] = {"experiment": experiment, "name": name, "parent_id": parent_id, "tags": dict(tags),
                             "params": {}, "metrics": {}, "artifacts": {}, "status": "RUNNING"}
        self.log_params(run_id, params)
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

    def reopen(self, run_id):
        self.runs[run_id]["status"] = "RUNNING"

    def delete_run(self, run_id):
        del self.runs[run_id]

    def get_run(self, run_id):
        r = self.runs.get(run_id)
        if r is None:
            return None
        latest = {k: self.history(run_id, k)[-1][1] for k, v in r["metrics"].items() if v}
        return run_record(run_id, r["parent_id"], r["experiment"], r["name"], r["status"], dict(r["tags"]),
                          dict(r["params"]), latest, 0, None)

    def children(self, parent_id):
        return [self.get_run(rid) for rid, r in self.runs.items() if r["parent_id"] == parent_id]

    def experiment_runs(self, experiment):
        return [self.get_run(rid) for rid, r in self.runs.items() if r["experiment"] == experiment]

    def history(self, run_id, key):
        return sorted(self.runs[run_id]["metrics"].get(key, []), key=lambda point: point[0])

    def metric_keys(self, run_id):
        return list(self.runs[run_id]["metrics"])

    def last_logged_step(self, run_id):
        steps = [s for values in self.runs[run_id]["metrics"].values() for s, _ in values]
        return max(steps, default=-1)


class MlflowTracker(Tracker):
    """MLflow through ``MlflowClient``; a local SQLite store by default (``sqlite:///mlflow_runs/mlflow.db``).

    ``create=False`` (reading runs back: ``metacore compare``) opens only a store that exists, so a mistyped path
    is an error instead of a new empty store, and needs no write access to it.
    """

    def __init__(self, uri: str | None = None, artifact_root: str | Path | None = None, *,
                 create: bool = True) -> None:
        self.uri = uri or default_tracking_uri()
        self._artifact_root = Path(artifact_root) if artifact_root else None
        self._buffers: dict[str, list[Any]] = {}
        self._experiments: dict[str, str] = {}
        self._summaries: dict[str, dict | None] = {}
        if create:
            self._prepare_local_store()
        else:
            db = sqlite_path(self.uri)
            if db is not None and not db.is_file():
                raise UsageError(f"no MLflow store at {db} (run `metacore run` first, or pass --tracking-uri)")
        # with a tracking server MLflow prints "View run ... at: URL" on stdout when a run ends, which would break
        # --json (one JSON object on stdout and nothing else)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars on stderr
        self.link = StoreLink(self.uri)
        self._last_try = 0.0
        if self.link.remote:
            quick_http_failures()
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "creating tables" chatter on stderr
        logging.getLogger("alembic").setLevel(logging.WARNING)
        try:
            from mlflow.tracking import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets its own level on import
            # two processes creating one new SQLite store would race its migrations
            with self._store_lock() if create else contextlib.nullcontext():
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

    def _start_run(self, experiment, name, *, parent_id, tags, params) -> str:
        try:
            if parent_id:
                tags = {**tags, "mlflow.parentRunId": parent_id}
            run = self.link.call(self.client.create_run, self._experiment_id(experiment), tags=tags, run_name=name)
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

    def reopen(self, run_id):
        self.link.call(self.client.update_run, run_id, status="RUNNING")
        self._buffers.setdefault(run_id, [])

    def delete_run(self, run_id):
        self.link.call(self.client.delete_run, run_id)
        self._buffers.pop(run_id, None)

    # --- reading -----------------------------------------------------------------------------------------------
    def _record(self, run: Any, experiment: str) -> RunRecord:
        info, data = run.info, run.data
        return run_record(info.run_id, data.tags.get("mlflow.parentRunId"), experiment, info.run_name or "",
                          info.status, dict(data.tags), dict(data.params), dict(data.metrics), info.start_time or 0,
                          info.end_time)

    def get_run(self, run_id):
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return None
        return self._record(run, self.client.get_experiment(run.info.experiment_id).name)

    def children(self, parent_id):
        parent = self.client.get_run(parent_id)
        experiment = self.client.get_experiment(parent.info.experiment_id).name
        found = self.client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                        max_results=10000)
        return [self._record(r, experiment) for r in found]

    def experiment_runs(self, experiment):
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            known = sorted(e.name for e in self.client.search_experiments())
            raise UsageError(f"no experiment {experiment!r} in {self.uri} (known: {', '.join(known) or 'none'})")
        runs, token = [], None
        while True:
            page = self.client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
            runs.extend(self._record(r, experiment) for r in page)
            token = page.token
            if not token:
                break
        self._attach_wall_times(runs)
        return runs

    def history(self, run_id, key):
        found = sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        return [(int(m.step), float(m.value)) for m in found]

    def metric_keys(self, run_id):
        return list(self.client.get_run(run_id).data.metrics)

    def last_logged_step(self, run_id):
        run = self.client.get_run(run_id)
        steps = [m.step for key in run.data.metrics for m in self.client.get_metric_history(run_id, key)]
        return max(steps, default=-1)

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
