"""Prodigy (Mishchenko & Defazio, 2024) from the ``prodigyopt`` package: D-Adaptation's faster-growing successor.

The package's README: ``lr`` stays 1.0 and scales the estimated step size ``d`` (effective step ``d·lr``);
``d_coef`` scales the estimate, ``safeguard_warmup`` and ``use_bias_correction`` are the README's switches for runs
with a warmup. Weight decay is decoupled (AdamW-style) by default.
"""

from __future__ import annotations

from typing import ClassVar

from metacore.core.optimizer import Optimizer
from metacore.core.options import OptionSpec
from metacore.optimizers import common
from metacore.optimizers.dadapt import D0, GROWTH, d_times_lr, growth


class Prodigy(Optimizer):
    """Prodigy."""

    name = "prodigy"
    description = "Prodigy (prodigyopt): Adam with an estimated step size d; lr is a multiplier of d"
    requires = "prodigyopt"
    module = "prodigyopt"
    lr_free = True
    lr_meaning = "the multiplier of Prodigy's estimated step size d"
    options: ClassVar[dict[str, OptionSpec]] = {
        "d0": D0, "growth_rate": GROWTH,
        "d_coef": OptionSpec("d_coef", 1.0, float, "coefficient of the step-size estimate", 1e-6, 1e6),
        "decouple": OptionSpec("decouple", True, bool, "AdamW-style decoupled weight decay"),
        "use_bias_correction": OptionSpec("use_bias_correction", False, bool, "Adam's bias correction"),
        "safeguard_warmup": OptionSpec("safeguard_warmup", False, bool, "keep d from growing during a warmup"),
    }
    inherit: ClassVar[tuple[str, ...]] = ("beta1", "weight_decay")

    def hparams(self):
        return [common.lr(1.0, multiplier=True), common.beta1(0.9), common.weight_decay(0.0)]

    def build(self, model, hparams, ctx):
        from prodigyopt import Prodigy as Impl

        c = self.config
        return common.construct(self.name, lambda: Impl(
            common.trainable(model), lr=hparams["lr"], betas=common.betas(hparams),
            weight_decay=hparams["weight_decay"], d0=c["d0"], d_coef=c["d_coef"], growth_rate=growth(c),
            decouple=c["decouple"], use_bias_correction=c["use_bias_correction"],
            safeguard_warmup=c["safeguard_warmup"]))

    def effective_lr(self, optimizer):
        return d_times_lr(optimizer)
