"""One error family, so the CLI can tell a user's mistake (exit 2) from a bug (exit 1)."""

from __future__ import annotations


class MetacoreError(Exception):
    """Base of every error metacore raises on purpose. The CLI prints the message and exits 2."""


class UsageError(MetacoreError):
    """Bad input: an unknown name, a value out of bounds, a malformed flag."""


class RegistryError(MetacoreError):
    """A plugin registered something twice, or something that is not a task/controller."""


class DataError(MetacoreError):
    """Data are missing, truncated or of the wrong schema."""


class TrackingError(MetacoreError):
    """The MLflow store cannot be opened or written."""


class CheckpointError(MetacoreError):
    """No intact checkpoint, or a checkpoint location that cannot be written."""


class ControllerError(MetacoreError):
    """A controller proposed a change that is not allowed (unknown name, non-finite value)."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line error reports;
    ``with_type``: prefixed with the type's name (``OSError: ...``)."""
    lines = str(exc).strip().splitlines()
    if not with_type:
        return lines[0] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
class ControllerFailed(Exception):
    """A controller raised (or proposed something refused) during a run, at ``step``.

    Deliberately not a :class:`MetacoreError`: it wraps either a bug in the controller (any exception: exit 1) or a
    refused value (``cause`` is a MetacoreError: exit 2); :attr:`bad_input` tells which.
    """

    def __init__(self, controller: str, step: int, cause: BaseException, *, at_start: bool = False) -> None:
        text = str(cause).strip().splitlines()
        detail = text[0] if text else ""
        what = detail if isinstance(cause, MetacoreError) else f"{type(cause).__name__}: {detail}".rstrip(": ")
        when = "was refused when the run started" if at_start else f"failed at step {step}"
        super().__init__(f"controller {controller!r} {when}: {what}")
        self.controller, self.step, self.cause = controller, step, cause

    @property
    def bad_input(self) -> bool:
        return isinstance(self.cause, MetacoreError)
