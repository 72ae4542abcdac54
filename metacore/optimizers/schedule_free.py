"""Schedule-Free SGD and AdamW (Defazio et al., 2024) from the ``schedulefree`` package.

The package's README, followed here: the optimizer is switched to ``train()`` before training and to ``eval()``
around every evaluation (the model is evaluated at the averaged weights ``x``, trained at ``y``), and on models with
BatchNorm the running statistics are recomputed at the evaluation weights (``torch.optim.swa_utils.update_bn`` over
the first ``bn_batches`` evaluation batches of the training split). After the evaluation the training weights and
the training-time BatchNorm statistics are put back bit for bit, so evaluating never changes the training
trajectory and a resumed run stays exact. Checkpoints hold the training weights ``y`` and the optimizer's ``z``.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import ClassVar

from metacore.core.optimizer import Optimizer
from metacore.core.options import OptionSpec
from metacore.optimizers import common

OPTIONS = {
    "warmup_steps": OptionSpec("warmup_steps", 0, int, "linear warmup of lr over this many steps", 0, None),
    "r": OptionSpec("r", 0.0, float, "polynomial weighting power of the average", 0.0, None),
    "weight_lr_power": OptionSpec("weight_lr_power", 2.0, float, "during warmup, average weights ∝ lr^power",
                                  0.0, None),
    "bn_batches": OptionSpec("bn_batches", 4, int, "evaluation batches of the training split used to recompute "
                             "BatchNorm statistics at the evaluation weights", 1, None),
}


class ScheduleFreeSGD(Optimizer):
    """Schedule-Free SGD."""

    name = "sf-sgd"
    description = "Schedule-Free SGD (schedulefree): no schedule; evaluates at the averaged weights"
    requires = "schedulefree"
    module = "schedulefree"
    lr_free = True
    lr_meaning = "Schedule-Free SGD's learning rate (no schedule is applied to it)"
    options: ClassVar[dict[str, OptionSpec]] = dict(OPTIONS)
    inherit: ClassVar[tuple[str, ...]] = ("momentum", "weight_decay")
    impl = "SGDScheduleFree"

    def hparams(self):
        # the package's defaults; its momentum must lie strictly inside (0, 1)
        return [common.lr(1.0), common.momentum(0.9, low=0.0), common.weight_decay(0.0)]

    def kwargs(self, hparams) -> dict:
        return {"momentum": hparams["momentum"]}

    def build(self, model, hparams, ctx):
        import schedulefree

        impl = getattr(schedulefree, self.impl)
        c = self.config
        opt = common.construct(self.name, lambda: impl(
            common.trainable(model), lr=hparams["lr"], weight_decay=hparams["weight_decay"],
            warmup_steps=c["warmup_steps"], r=c["r"], weight_lr_power=c["weight_lr_power"], **self.kwargs(hparams)))
        opt.train()
        return opt

    def effective_lr(self, optimizer):
        return float(optimizer.param_groups[0]["scheduled_lr"]) or None

    @contextlib.contextmanager
    def evaluation(self, optimizer, model, task, data, ctx):
        import torch
        from torch.optim.swa_utils import update_bn

        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved = [p.detach().clone() for p in params]
        norms = [m for m in model.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        stats = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
        optimizer.eval()
        try:
            if norms:
                with torch.no_grad():
                    update_bn(itertools.islice(task.eval_batches(data, "train", ctx), self.config["bn_batches"]),
                              model)
            yield
        finally:
            optimizer.train()
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
                for m, s in zip(norms, stats, strict=True):
                    m.load_state_dict(s)


class ScheduleFreeAdamW(ScheduleFreeSGD):
    """Schedule-Free AdamW."""

    name = "sf-adamw"
    description = "Schedule-Free AdamW (schedulefree): no schedule; evaluates at the averaged weights"
    lr_meaning = "Schedule-Free AdamW's learning rate (no schedule is applied to it)"
    inherit: ClassVar[tuple[str, ...]] = ("beta1", "weight_decay")
    impl = "AdamWScheduleFree"

    def hparams(self):
        return [common.lr(0.0025), common.beta1(0.9), common.weight_decay(0.0)]

    def kwargs(self, hparams) -> dict:
        return {"betas": common.betas(hparams)}
