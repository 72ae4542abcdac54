"""Declared options of tasks and controllers, and parsing of ``KEY=VALUE`` strings against them.

Task options (``--set``) and controller options (``--controller-set``) are plain typed values with optional bounds or
choices. Hyperparameters have their own richer spec in :mod:`metacore.core.hparams`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from metacore.core.errors import UsageError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class OptionSpec:
    """A typed option with a default. ``type`` is one of ``int``, ``float``, ``str``, ``bool``."""

    name: str
    default: Any
    type: type = float
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None

    def parse(self, raw: Any, owner: str = "") -> Any:
        """Convert ``raw`` (a string from the command line, or a value) and check it; raise UsageError if bad."""
        where = f" for {owner}" if owner else ""
        value: Any
        if self.type is bool:
            if isinstance(raw, bool):
                value = raw
            elif str(raw).lower() in _TRUE:
                value = True
            elif str(raw).lower() in _FALSE:
                value = False
            else:
                raise UsageError(f"option {self.name}{where} expects true/false, got {raw!r}")
        elif self.type in (int, float):
            value = parse_number(raw, f"option {self.name}{where}", integer=self.type is int)
            if self.low is not None and value < self.low or self.high is not None and value > self.high:
                raise UsageError(f"option {self.name}{where} {bounds_text(self.low, self.high)}, got {raw!r}")
        else:
            value = str(raw)
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"option {self.name}{where} must be one of {', '.join(map(str, self.choices))}; got {raw!r}"
            )
        return value


@dataclass
class OptionSet:
    """Options declared by one task or controller."""

    owner: str
    specs: dict[str, OptionSpec] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        return {name: spec.default for name, spec in self.specs.items()}

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``given``; unknown keys are an error that lists the known ones."""
        values = self.defaults()
        for key, raw in given.items():
            if key not in self.specs:
                known = ", ".join(sorted(self.specs)) or "none"
                raise UsageError(f"unknown option {key!r} for {self.owner} (known: {known})")
            values[key] = self.specs[key].parse(raw, self.owner)
        return values


def bounds_text(low: float | None, high: float | None, fmt: str = "") -> str:
    """``must lie in [low, high]``, or ``must be at least low`` / ``at most high`` when one side is open."""
    def show(v: float) -> str:
        return format(v, fmt)

    low = None if low is None or low == -math.inf else low
    high = None if high is None or high == math.inf else high
    if low is not None and high is not None:
        return f"must lie in [{show(low)}, {show(high)}]"
    if low is not None:
        return f"must be at least {show(low)}"
    if high is not None:
        return f"must be at most {show(high)}"
    return "must be a number"


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a malformed item is a UsageError naming the flag."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value.strip()
    return out


def parse_number(raw: Any, what: str, integer: bool = False) -> float | int:
    """A finite float (or an integer when ``integer``) from ``raw``; UsageError naming ``what`` otherwise."""
    if isinstance(raw, bool):
        raise UsageError(f"{what} expects a number, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{what} expects a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"{what} must be finite, got {raw!r}")
    if integer:
        if value != int(value):
            raise UsageError(f"{what} expects an integer, got {raw!r}")
        return int(value)
    return value
