"""torch's own SGD, Adam and AdamW as plugins (what the tasks build by default, selectable for any task)."""

from __future__ import annotations

from typing import ClassVar

from metacore.core.optimizer import Optimizer
from metacore.optimizers import common


class SGD(Optimizer):
    """torch.optim.SGD with momentum."""

    name = "sgd"
    description = "torch.optim.SGD (momentum, coupled weight decay)"
    family = "sgd"
    inherit: ClassVar[tuple[str, ...]] = ("lr", "momentum", "weight_decay")

    def hparams(self):
        return [common.lr(1e-2), common.momentum(0.9), common.weight_decay(0.0)]

    def build(self, model, hparams, ctx):
        import torch

        return torch.optim.SGD(common.trainable(model), lr=hparams["lr"], momentum=hparams["momentum"],
                               weight_decay=hparams["weight_decay"], fused=ctx.on_cuda or None)


class Adam(Optimizer):
    """torch.optim.Adam."""

    name = "adam"
    description = "torch.optim.Adam (coupled weight decay)"
    family = "adam"
    inherit: ClassVar[tuple[str, ...]] = ("lr", "beta1", "weight_decay")
    torch_class = "Adam"

    def hparams(self):
        return [common.lr(1e-3), common.beta1(0.9), common.weight_decay(0.0)]

    def build(self, model, hparams, ctx):
        import torch

        cls = getattr(torch.optim, self.torch_class)
        return cls(common.trainable(model), lr=hparams["lr"], betas=common.betas(hparams),
                   weight_decay=hparams["weight_decay"], fused=ctx.on_cuda or None)


class AdamW(Adam):
    """torch.optim.AdamW."""

    name = "adamw"
    description = "torch.optim.AdamW (decoupled weight decay)"
    torch_class = "AdamW"

    def hparams(self):
        return [common.lr(1e-3), common.beta1(0.9), common.weight_decay(1e-2)]
