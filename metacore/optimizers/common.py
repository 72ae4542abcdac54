"""What the built-in optimizer plugins share: hyperparameter specs, quiet construction, BatchNorm detection."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable

from metacore.core.errors import UsageError
from metacore.core.hparams import HParamSpec


def lr(default: float, *, multiplier: bool = False) -> HParamSpec:
    if multiplier:
        return HParamSpec("lr", default, 1e-6, 100.0, log=True,
                          help="multiplier of the step size the optimizer estimates (1.0: the authors' setting)")
    return HParamSpec("lr", default, 1e-8, 100.0, log=True, help="learning rate")


def momentum(default: float = 0.9, *, low: float = 0.0) -> HParamSpec:
    return HParamSpec("momentum", default, low, 0.999, help="momentum")


def beta1(default: float = 0.9) -> HParamSpec:
    return HParamSpec("beta1", default, 0.0, 0.999, group_key="betas", index=0, help="first-moment decay (beta1)")


def weight_decay(default: float = 0.0) -> HParamSpec:
    return HParamSpec("weight_decay", default, 0.0, 1.0, help="weight decay")


def construct(name: str, make: Callable[[], Any]) -> Any:
    """Build a package's optimizer: its prints go to stderr (``--json`` keeps stdout to itself), and the
    package's own ValueError on a bad value becomes a one-line error naming the optimizer."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return make()
    except ValueError as exc:
        raise UsageError(f"optimizer {name}: {exc}") from None


def has_batchnorm(model: Any) -> bool:
    import torch.nn as nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def betas(hparams: dict, beta2: float = 0.999) -> tuple[float, float]:
    return (float(hparams.get("beta1", 0.9)), beta2)
