"""Reading scalars back: a hyperparameter or diagnostic may be a Python number or a 0-dim tensor on any device."""

from __future__ import annotations

from typing import Any, Mapping


def to_float(value: Any) -> float:
    """A Python float from a number or a 0-dim tensor (``.item()``: a host sync for a tensor on an accelerator)."""
    return float(value.item()) if hasattr(value, "item") else float(value)


def floats(values: Mapping[str, Any]) -> dict[str, float]:
    """Every value of ``values`` as a Python float."""
    return {k: to_float(v) for k, v in values.items()}
