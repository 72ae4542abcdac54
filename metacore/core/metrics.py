"""Metric helpers shared by tasks (scikit-learn does the counting)."""

from __future__ import annotations

from typing import Any


def classification_metrics(logits: Any, targets: Any) -> dict[str, float]:
    """``accuracy`` and ``f1_macro`` from logits of shape (n, classes) and integer targets."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = logits.argmax(dim=1).numpy()
    y = targets.numpy()
    return {"accuracy": float(accuracy_score(y, pred)), "f1_macro": float(f1_score(y, pred, average="macro"))}

