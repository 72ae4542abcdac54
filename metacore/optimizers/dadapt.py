"""D-Adaptation (Defazio & Mishchenko, 2023) from the ``dadaptation`` package: SGD and Adam variants.

The package's README: ``lr`` stays 1.0 and acts as a multiplier of the distance estimate ``d`` (the effective step
size is ``d·lr``); ``d0`` is the initial estimate and ``growth_rate`` caps how fast ``d`` may grow.
"""

from __future__ import annotations

import math
from typing import ClassVar

from metacore.core.optimizer import Optimizer
from metacore.core.options import OptionSpec
from metacore.optimizers import common

D0 = OptionSpec("d0", 1e-6, float, "initial estimate of the distance to the solution", 1e-12, 1.0)
GROWTH = OptionSpec("growth_rate", 0.0, float, "largest factor by which d may grow per step (0: unbounded, the "
                    "package's inf)", 0.0, None)


def growth(config: dict) -> float:
    return float(config["growth_rate"]) or math.inf


def d_times_lr(optimizer) -> float:
    group = optimizer.param_groups[0]
    return float(group["d"]) * float(group["lr"])


class DAdaptSGD(Optimizer):
    """D-Adaptation SGD."""

    name = "dadapt-sgd"
    description = "D-Adaptation SGD (dadaptation): lr is a multiplier of the estimated step size d"
    requires = "dadaptation"
    module = "dadaptation"
    lr_free = True
    lr_meaning = "the multiplier of D-Adaptation's estimated step size d"
    options: ClassVar[dict[str, OptionSpec]] = {"d0": D0, "growth_rate": GROWTH}
    inherit: ClassVar[tuple[str, ...]] = ("momentum", "weight_decay")

    def hparams(self):
        return [common.lr(1.0, multiplier=True), common.momentum(0.9), common.weight_decay(0.0)]

    def build(self, model, hparams, ctx):
        from dadaptation import DAdaptSGD as Impl

        return common.construct(self.name, lambda: Impl(
            common.trainable(model), lr=hparams["lr"], momentum=hparams["momentum"],
            weight_decay=hparams["weight_decay"], d0=self.config["d0"], growth_rate=growth(self.config)))

    def effective_lr(self, optimizer):
        return d_times_lr(optimizer)


class DAdaptAdam(Optimizer):
    """D-Adaptation Adam."""

    name = "dadapt-adam"
    description = "D-Adaptation Adam (dadaptation): lr is a multiplier of the estimated step size d"
    requires = "dadaptation"
    module = "dadaptation"
    lr_free = True
    lr_meaning = "the multiplier of D-Adaptation's estimated step size d"
    options: ClassVar[dict[str, OptionSpec]] = {
        "d0": D0, "growth_rate": GROWTH,
        "decouple": OptionSpec("decouple", False, bool, "AdamW-style decoupled weight decay"),
        "use_bias_correction": OptionSpec("use_bias_correction", False, bool, "Adam's bias correction"),
    }
    inherit: ClassVar[tuple[str, ...]] = ("beta1", "weight_decay")

    def hparams(self):
        return [common.lr(1.0, multiplier=True), common.beta1(0.9), common.weight_decay(0.0)]

    def build(self, model, hparams, ctx):
        from dadaptation import DAdaptAdam as Impl

        return common.construct(self.name, lambda: Impl(
            common.trainable(model), lr=hparams["lr"], betas=common.betas(hparams),
            weight_decay=hparams["weight_decay"], d0=self.config["d0"], growth_rate=growth(self.config),
            decouple=self.config["decouple"], use_bias_correction=self.config["use_bias_correction"]))

    def effective_lr(self, optimizer):
        return d_times_lr(optimizer)
