"""DoG and its layer-wise LDoG (Ivgi, Hinder & Carmon, 2023) from the ``dog-optimizer`` package.

The step size ``eta = max distance travelled from the start / sqrt(sum of squared gradient norms)`` needs no
learning rate; ``lr`` (the paper's ``c``) stays 1.0. The authors' advice, followed here: ``reps_rel`` (the first
step's relative size) is 1e-6, except on models with BatchNorm, where it is 1e-4. (They also recommend averaging
the iterates, which the package provides separately; these runs evaluate the last iterate.)
"""

from __future__ import annotations

from typing import ClassVar

from metacore.core.optimizer import Optimizer
from metacore.core.options import OptionSpec
from metacore.optimizers import common

REPS_PLAIN, REPS_BATCHNORM = 1e-6, 1e-4


class DoG(Optimizer):
    """DoG (one step size for the whole model)."""

    name = "dog"
    description = "DoG (dog-optimizer): distance over gradients; lr is a multiplier of the step size eta"
    requires = "dog-optimizer"
    module = "dog"
    lr_free = True
    lr_meaning = "the multiplier c of DoG's step size eta"
    options: ClassVar[dict[str, OptionSpec]] = {
        "reps_rel": OptionSpec("reps_rel", 0.0, float, "relative size of the first step (0: the authors' advice, "
                               "1e-4 on models with BatchNorm, else 1e-6)", 0.0, 1.0),
        "init_eta": OptionSpec("init_eta", 0.0, float, "the first step size itself, overriding reps_rel (0: off)",
                               0.0, None),
    }
    inherit: ClassVar[tuple[str, ...]] = ("weight_decay",)
    impl = "DoG"

    def hparams(self):
        return [common.lr(1.0, multiplier=True), common.weight_decay(0.0)]

    def reps_rel(self, model) -> float:
        given = float(self.config["reps_rel"])
        if given:
            return given
        return REPS_BATCHNORM if common.has_batchnorm(model) else REPS_PLAIN

    def build(self, model, hparams, ctx):
        import dog

        impl = getattr(dog, self.impl)
        init_eta = float(self.config["init_eta"]) or None
        return common.construct(self.name, lambda: impl(
            common.trainable(model), lr=hparams["lr"], weight_decay=hparams["weight_decay"],
            reps_rel=self.reps_rel(model), init_eta=init_eta))

    def effective_lr(self, optimizer):
        etas = optimizer.param_groups[0].get("eta")
        if not etas:
            return None  # before the first step
        return float(sum(float(e) for e in etas) / len(etas))


class LDoG(DoG):
    """LDoG (a step size per layer; the logged value is their mean)."""

    name = "ldog"
    description = "LDoG (dog-optimizer): layer-wise DoG; lr is a multiplier of each layer's step size"
    lr_meaning = "the multiplier c of LDoG's per-layer step sizes"
    impl = "LDoG"
