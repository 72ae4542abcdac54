"""Writing to an MLflow store that may be busy (SQLite locked by another writer) or away (a server that stopped).

Training never waits on the store. Metric writes that fail because the store is away stay buffered and are retried
at the next flush; the first failure is reported once on stderr, and the recovery too. Writes that a run cannot go on
without (creating a run, ending it, its tags and summary) retry with backoff for up to ``METACORE_TRACKING_WAIT``
seconds (default 60); then the link gives up with one clear :class:`TrackingError`, and every later write fails at
once with the same message instead of waiting again. Checkpoints hold the metrics not yet delivered
(``Tracker.undelivered``), so ``--resume`` delivers them once the store is back: nothing is lost.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from metacore.core.errors import TrackingError, first_line

WAIT_ENV = "METACORE_TRACKING_WAIT"
# Errors of a store that answers but refuses the request: retrying cannot help.
_REFUSALS = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
             "PERMISSION_DENIED", "UNAUTHENTICATED")


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def quick_http_failures() -> None:
    """MLflow's HTTP client retries a refused connection for minutes by default; the link retries instead, so each
    request fails fast (a user's own settings of these variables win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def is_transient(exc: BaseException, remote: bool) -> bool:
    """A lock held by another SQLite writer, or (remote stores) a server that does not answer."""
    text = str(exc)
    if "locked" in text.lower():
        return True
    if not remote:
        return False
    code = getattr(exc, "error_code", None)
    return code not in _REFUSALS


class StoreLink:
    """Calls into the store with the retry policy above; remembers whether the store is away."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.remote = is_remote(uri)
        self.wait_s = float(os.environ.get(WAIT_ENV) or 60)
        self.down_since: float | None = None
        self.last_error = ""
        self.given_up: str | None = None
        self.failures = 0  # failed attempts, for the record

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A write the run needs: retry with backoff while the store is busy or away, then give up clearly."""
        if self.given_up:
            raise TrackingError(self.given_up)
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc, self.remote):
                    raise
                self._failed(exc)
                if time.monotonic() + delay > deadline:
                    self.given_up = (f"the MLflow store {self.uri} did not answer for {self.wait_s:g} s "
                                     f"({self.last_error})")
                    raise TrackingError(self.given_up) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._answered()
            return result

    def try_call(self, fn: Any, *args: Any, **kwargs: Any) -> bool:
        """A write that may wait (buffered metrics): one attempt (plus short lock retries); False if the store is
        away, so the caller keeps the data and training goes on."""
        if self.given_up:
            return False
        try:
            if self.remote:
                fn(*args, **kwargs)
            else:  # SQLite: a lock is brief, wait for it as before
                self.call(fn, *args, **kwargs)
                return True
        except TrackingError:
            return False
        except Exception as exc:
            if not is_transient(exc, self.remote):
                raise
            self._failed(exc)
            return False
        self._answered()
        return True

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = first_line(exc)
        if self.down_since is None and "locked" not in self.last_error.lower():
            self.down_since = time.monotonic()
            print(f"metacore: warning: the MLflow store {self.uri} is not answering ({self.last_error}); training "
                  "goes on, metrics are kept and retried", file=sys.stderr)

    def _answered(self) -> None:
        if self.down_since is not None:
            print(f"metacore: the MLflow store {self.uri} answers again after "
                  f"{time.monotonic() - self.down_since:.0f} s; buffered metrics delivered", file=sys.stderr)
            self.down_since = None
