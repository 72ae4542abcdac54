"""What the hypergradient controller knows of torch's optimizers: which family an optimizer is (``sgd``: SGD;
``adam``: Adam, AdamW; ``other``: the learning rate only), which of a task's hyperparameters is the learning rate,
the momentum (Adam's ``β1``) and the weight decay, and the momentum and weight-decay derivatives computed from each
family's state (the formulas are in :mod:`metacore.controllers.hypergrad_math`).
"""

from __future__ import annotations

from typing import Any, Mapping

from metacore.controllers import hypergrad_math as hm
from metacore.controllers.hypergrad_memory import StepMemory
from metacore.core.hparams import HParamSpace
from metacore.core.values import to_float


def role_names(space: HParamSpace) -> dict[str, str]:
    """Which of the task's hyperparameters is the learning rate, the momentum (or Adam's beta1), the weight decay."""
    found: dict[str, str] = {}
    for spec in space:
        if spec.acts_on != "optimizer":
            continue
        if spec.key == "lr":
            found.setdefault("lr", spec.name)
        elif spec.key == "momentum" or (spec.key == "betas" and spec.index == 0):
            found.setdefault("momentum", spec.name)
        elif spec.key == "weight_decay":
            found.setdefault("weight_decay", spec.name)
    return found


def family(opt: Any) -> str:
    import torch

    if isinstance(opt, torch.optim.SGD):
        return "sgd"
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    return "other"


def decoupled(group: Mapping[str, Any]) -> bool:
    return bool(group.get("decoupled_weight_decay", False))


def takes_tensor_lr(opt: Any) -> bool:
    """torch 2.14's foreach/for-loop SGD turns a tensor lr into a Python number inside ``step()`` (``alpha=-lr``: a
    host sync); fused SGD, and Adam/AdamW when ``capturable`` or ``fused``, take a device tensor without a read-back."""
    kind = family(opt)
    if kind == "sgd":
        return all(g.get("fused") for g in opt.param_groups)
    return kind == "adam" and all(g.get("capturable") or g.get("fused") for g in opt.param_groups)


def momentum_hypergrad(opt: Any, kind: str, mem: StepMemory, params: list, grads: list, g_norm: Any) -> tuple:
    """``(∂f/∂μ, cos(g, ∂θ_t/∂μ))``: momentum for SGD, ``β1`` for Adam/AdamW, over the parameters with a gradient
    (``params``, ``grads`` per group, from :meth:`StepMemory.with_grads`)."""
    import torch

    h = torch.zeros((), device=mem.device, dtype=torch.float64)
    dot_sum = torch.zeros_like(h)
    s_sq = torch.zeros_like(h)
    for gi, (group, ps, gs) in enumerate(zip(opt.param_groups, params, grads, strict=True)):
        if not ps:
            continue
        mom_prev = mem.momentum_before(gi, ps)
        lr = to_float(group["lr"])
        if kind == "sgd":
            sens = mom_prev  # ∂θ_t/∂μ = -α buf_{s-1}
            scale = -lr
        else:
            beta1, beta2 = (to_float(b) for b in group["betas"])
            states = [opt.state[p] for p in ps]
            k = float(states[0]["step"])
            sens = hm.adam_beta1_sensitivity(mom_prev, [s["exp_avg"] for s in states],
                                             [s["exp_avg_sq"] for s in states], k, beta1, beta2,
                                             to_float(group["eps"]), lr)
            scale = 1.0
        d = hm.dot(gs, sens).double() * scale
        h = h + d
        dot_sum = dot_sum + d
        s_sq = s_sq + (hm.norm(sens).double() * abs(scale)) ** 2
    return h, hm.cosine(dot_sum, g_norm.double(), s_sq.sqrt())


def weight_decay_hypergrad(opt: Any, kind: str, mem: StepMemory, params: list, grads: list, prevs: list, g_norm: Any,
                           had_buf: bool) -> tuple:
    """``(∂f/∂λ, cos(g, ∂θ_t/∂λ))``: coupled L2 for SGD and Adam, decoupled for AdamW (``prevs``: θ_s per group;
    ``had_buf``: SGD's last step had its momentum buffers already)."""
    import torch

    h = torch.zeros((), device=mem.device, dtype=torch.float64)
    s_sq = torch.zeros_like(h)
    for gi, (group, ps, gs, bs) in enumerate(zip(opt.param_groups, params, grads, prevs, strict=True)):
        if not ps:
            continue
        lr = to_float(group["lr"])
        if kind == "adam" and not decoupled(group):
            mom_prev = mem.momentum_before(gi, ps)
            states = [opt.state[p] for p in ps]
            beta1, beta2 = (to_float(b) for b in group["betas"])
            sens = hm.adam_l2_sensitivity(bs, mom_prev, [s["exp_avg"] for s in states],
                                          [s["exp_avg_sq"] for s in states], float(states[0]["step"]),
                                          beta1, beta2, to_float(group["eps"]), lr)
            d = hm.dot(gs, sens).double()
            n = hm.norm(sens).double()
        else:
            if kind == "sgd":
                c = hm.sgd_wd_coefficient(to_float(group["momentum"]), to_float(group["dampening"]),
                                          bool(group["nesterov"]), had_buf)
            else:
                c = 1.0
            d = hm.dot(gs, bs).double() * (-lr * c)  # ∂θ_t/∂λ = -α c θ_s
            n = hm.norm(bs).double() * abs(lr * c)
        h = h + d
        s_sq = s_sq + n**2
    return h, hm.cosine(h, g_norm.double(), s_sq.sqrt())
