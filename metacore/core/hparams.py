"""Hyperparameter specs: what a task lets a controller (or the user) change, within which bounds, and where it acts.

Every value that reaches a run, from ``--set`` or from a controller, passes through :meth:`HParamSpace.validate`, so a
negative learning rate, a NaN or an unknown name is rejected with a message that says what would have been allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from metacore.core.errors import ControllerError, UsageError
from metacore.core.options import bounds_text, parse_number

ActsOn = Literal["optimizer", "model", "data"]


@dataclass(frozen=True)
class HParamSpec:
    """One tunable hyperparameter.

    ``acts_on`` says where the value goes: ``optimizer`` writes ``group_key`` of every param group (``lr``,
    ``momentum``, ``weight_decay``; ``betas`` with ``index`` for Adam's beta1/beta2), ``model`` is a model knob the task
    applies (dropout), ``data`` is read by the data pipeline (batch size). ``log`` marks values that controllers
    should move multiplicatively (learning rates), which also means they must stay strictly positive.
    """

    name: str
    default: float
    low: float
    high: float
    log: bool = False
    acts_on: ActsOn = "optimizer"
    group_key: str | None = None
    index: int | None = None
    integer: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if not (self.low <= self.default <= self.high):
            raise ValueError(f"hparam {self.name}: default {self.default} outside [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"hparam {self.name}: log-scale needs a positive lower bound")

    @property
    def key(self) -> str:
        """The optimizer param-group key this spec writes (its own name unless ``group_key`` says otherwise)."""
        return self.group_key or self.name

    def check(self, raw: Any, source: str = "") -> float | int:
        """Parse and bounds-check one value; raise UsageError on anything not allowed."""
        what = f"{self.name}{' from ' + source if source else ''}"
        value = parse_number(raw, what, integer=self.integer)
        if not (self.low <= value <= self.high):
            raise UsageError(f"{what} {bounds_text(self.low, self.high, 'g')}, got {raw!r}")
        return value

    def write(self, group: dict, value: Any) -> None:
        """Set this hyperparameter in one optimizer param group (one element of a tuple key such as ``betas``)."""
        if self.index is None:
            group[self.key] = value
        else:
            parts = list(group[self.key])
            parts[self.index] = value
            group[self.key] = tuple(parts)

    def clip(self, value: float) -> float | int:
        """Clamp a finite value into bounds (what controllers get when they overshoot)."""
        value = min(max(float(value), self.low), self.high)
        return int(round(value)) if self.integer else value


class HParamSpace:
    """The ordered set of a task's hyperparameters."""

    def __init__(self, specs: Iterable[HParamSpec], owner: str = "task") -> None:
        self.owner = owner
        self.specs: dict[str, HParamSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise ValueError(f"{owner}: hyperparameter {spec.name!r} declared twice")
            self.specs[spec.name] = spec

    def __iter__(self):
        return iter(self.specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __getitem__(self, name: str) -> HParamSpec:
        return self.specs[name]

    def names(self) -> list[str]:
        return list(self.specs)

    def defaults(self) -> dict[str, float]:
        return {s.name: s.default for s in self.specs.values()}

    def _spec(self, name: str) -> HParamSpec:
        if name not in self.specs:
            raise UsageError(f"unknown hyperparameter {name!r} for {self.owner} (known: {', '.join(self.specs)})")
        return self.specs[name]

    def validate(self, values: dict[str, Any], source: str = "") -> dict[str, float]:
        """Check user-given values strictly (unknown name, non-number, out of bounds: UsageError)."""
        return {name: self._spec(name).check(raw, source) for name, raw in values.items()}

    def resolve(self, given: dict[str, Any]) -> dict[str, float]:
        """Defaults overridden by validated ``given`` values."""
        values = self.defaults()
        values.update(self.validate(given))
        return values

    def sanitize(self, changes: dict[str, Any], owner: str, deferred: list | None = None) -> dict[str, Any]:
        """Controller output: unknown names and non-finite values are errors, finite values are clipped into bounds.

        Values may be 0-dim tensors (so a controller can keep a learning rate on the device between logging
        intervals). A non-finite tensor is refused like a non-finite float. On the CPU it is checked at once; on an
        accelerator, where a check would be a host sync per step, it is clamped on the device and, if ``deferred``
        is a list, ``(name, finite_flag)`` is appended for the caller to check at its next sync
        (:func:`check_deferred`); without ``deferred`` it is checked at once there too.
        """
        out: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in self.specs:
                raise ControllerError(f"controller {owner} changed unknown hyperparameter {name!r}")
            spec = self.specs[name]
            if hasattr(value, "clamp"):  # a torch tensor
                value = value.detach()
                if deferred is None or value.device.type == "cpu":
                    if not bool(value.isfinite().all()):
                        raise non_finite(owner, name, value)
                else:
                    deferred.append((name, value.isfinite().all(), value))
                out[name] = value.nan_to_num(nan=spec.low, posinf=spec.high, neginf=spec.low).clamp(
                    spec.low, spec.high
                )
                continue
            value = float(value)
            if not math.isfinite(value):
                raise non_finite(owner, name, value)
            out[name] = spec.clip(value)
        return out


def non_finite(owner: str, name: str, value: Any) -> ControllerError:
    """The one message for a non-finite controller value, float or tensor alike."""
    shown = float(value.float().reshape(-1)[0].item()) if hasattr(value, "reshape") else float(value)
    return ControllerError(f"controller {owner} proposed non-finite {name}={shown}")


def check_deferred(deferred: list, owner: str) -> None:
    """Check the finiteness flags :meth:`HParamSpace.sanitize` deferred (one host sync for all), then clear them."""
    if not deferred:
        return
    import torch

    flags = torch.stack([flag for _, flag, _ in deferred]).cpu()
    items = list(deferred)
    deferred.clear()
    for (name, _, value), ok in zip(items, flags.tolist(), strict=True):
        if not ok:
            raise non_finite(owner, name, value)
