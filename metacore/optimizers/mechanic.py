"""Mechanic (Cutkosky, Defazio & Mehta, 2023) from the ``mechanic-pytorch`` package, wrapping SGD and AdamW.

Mechanic learns a scale ``s`` of the base optimizer's updates, starting from ``s_init`` (1e-8): the effective step
size is ``s·lr``, where ``lr`` is the base optimizer's rate (the task's, by default; the authors' claim is that a
mis-set base rate does not matter). The package keeps, in the optimizer's state, per-parameter reference weights
keyed by the parameter tensors themselves; its state dict is converted to a list in parameter order (and back), so
checkpoints hold tensors and plain values only and load with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from metacore.core.optimizer import Optimizer
from metacore.core.options import OptionSpec
from metacore.optimizers import common

KEY = "_mechanic"


def _mechanized(base: type, s_decay: float, s_init: float) -> type:
    from mechanic_pytorch import mechanize

    class Mechanized(mechanize(base, s_decay=s_decay, s_init=s_init)):
        def _params(self) -> list[Any]:
            return [p for g in self.param_groups for p in g["params"]]

        def state_dict(self):
            sd = super().state_dict()
            mech = sd["state"].get(KEY)
            if mech is None:
                return sd
            plain = {k: v for k, v in mech.items() if isinstance(k, str)}
            plain["refs"] = [mech[p]["ref"] for p in self._params()]
            return {**sd, "state": {**sd["state"], KEY: plain}}

        def load_state_dict(self, state_dict):
            mech = state_dict["state"].get(KEY)
            rest = {k: v for k, v in state_dict["state"].items() if k != KEY}
            super().load_state_dict({**state_dict, "state": rest})
            self.state.pop(KEY, None)
            if mech is None:
                return
            params = self._params()
            restored = {k: (v.detach().clone() if hasattr(v, "clone") else v) for k, v in mech.items()
                        if k != "refs"}
            for p, ref in zip(params, mech["refs"], strict=True):
                restored[p] = {"ref": ref.detach().clone().to(p.device)}
            self.state[KEY] = restored

    Mechanized.__name__ = f"Mechanic{base.__name__}"
    return Mechanized


def scale(optimizer) -> float | None:
    mech = optimizer.state.get(KEY)
    if mech is None:
        return None  # before the first step
    return float(mech["s"].sum()) * float(optimizer.param_groups[0]["lr"])


OPTIONS = {
    "s_decay": OptionSpec("s_decay", 0.01, float, "Mechanic's weight-decay analogue on the scale (lambda)", 0.0, None),
    "s_init": OptionSpec("s_init", 1e-8, float, "initial scale s", 1e-16, 1.0),
}


class MechanicSGD(Optimizer):
    """Mechanic on SGD with momentum."""

    name = "mechanic-sgd"
    description = "Mechanic (mechanic-pytorch) on torch SGD: learns the scale s of SGD's updates"
    requires = "mechanic-pytorch"
    module = "mechanic_pytorch"
    lr_free = True
    lr_meaning = "the base SGD rate, which Mechanic scales by its learned s"
    options: ClassVar[dict[str, OptionSpec]] = dict(OPTIONS)
    inherit: ClassVar[tuple[str, ...]] = ("lr", "momentum", "weight_decay")

    def hparams(self):
        return [common.lr(1e-2), common.momentum(0.9), common.weight_decay(0.0)]

    def build(self, model, hparams, ctx):
        import torch

        cls = _mechanized(torch.optim.SGD, self.config["s_decay"], self.config["s_init"])
        return common.construct(self.name, lambda: cls(
            common.trainable(model), lr=hparams["lr"], momentum=hparams["momentum"],
            weight_decay=hparams["weight_decay"]))

    def effective_lr(self, optimizer):
        return scale(optimizer)


class MechanicAdamW(MechanicSGD):
    """Mechanic on AdamW."""

    name = "mechanic-adamw"
    description = "Mechanic (mechanic-pytorch) on torch AdamW: learns the scale s of AdamW's updates"
    lr_meaning = "the base AdamW rate, which Mechanic scales by its learned s"
    inherit: ClassVar[tuple[str, ...]] = ("lr", "beta1", "weight_decay")

    def hparams(self):
        return [common.lr(1e-3), common.beta1(0.9), common.weight_decay(1e-2)]

    def build(self, model, hparams, ctx):
        import torch

        cls = _mechanized(torch.optim.AdamW, self.config["s_decay"], self.config["s_init"])
        return common.construct(self.name, lambda: cls(
            common.trainable(model), lr=hparams["lr"], betas=common.betas(hparams),
            weight_decay=hparams["weight_decay"]))
