"""``hypergrad``: online hypergradient descent on the learning rate, momentum and weight decay, for any optimizer.

Baydin et al., "Online Learning Rate Adaptation with Hypergradient Descent" (ICLR 2018): after each backward pass the
derivative of the loss with respect to the hyperparameters of the *previous* optimizer step is one dot product away,
``∂f(θ_t)/∂α = -∇f(θ_t)·u_{s}``, and the rate moves against it. The derivations for the learning rate, momentum and
weight decay, and both update rules, are in :mod:`metacore.controllers.hypergrad_math`; what it needs of each
optimizer family (and the momentum and weight-decay derivatives from its state) in
:mod:`metacore.controllers.hypergrad_optimizers`.

How it stays generic and cheap (a :class:`~metacore.core.controller.GradientObserver`):

* The previous update direction is never recomputed per optimizer: the controller keeps a copy of the parameters
  before each step (the one extra parameter-sized buffer) and the next step's hypergradient uses the change the
  optimizer actually made, ``D = θ_s - θ_t = α u``. Momentum adaptation keeps one more copy (the optimizer's
  momentum buffer or Adam's first moment before the step); nothing else is stored.
* The parameters before the step and the current gradient are mirrored in flat buffers, the two rows of one
  ``(2, N)`` tensor (:mod:`metacore.controllers.hypergrad_memory` over :mod:`metacore.core.flat`: one fused copy
  each), so the learning rate's dot product and the two norms come from one matrix product over the whole model
  rather than one kernel per parameter tensor; momentum and weight decay work on the buffers' per-tensor views with
  fused ``torch._foreach_*`` passes. Everything stays on the parameters' device.
* The learning rate is a 0-dim tensor throughout; it is handed to the optimizer as a tensor on CUDA where the
  optimizer takes one without a host read-back (fused ``SGD``; ``Adam``/``AdamW`` with ``capturable=True`` or
  ``fused=True``), else as a float (on a CPU a float costs nothing). Diagnostics are tensors, read back only at
  logging intervals.
* ``signal=val``: every ``val_every`` steps the gradient of a validation batch replaces the training gradient in
  that step's hypergradients (``-∇f_val(θ_t)·u_s``), so the adaptation also follows held-out performance; the
  other steps use the training gradient, and every guard still acts every step.
"""

from __future__ import annotations

from typing import Any, Mapping

from metacore.controllers import hypergrad_math as hm
from metacore.controllers import hypergrad_optimizers as ho
from metacore.controllers.hypergrad_memory import StepMemory
from metacore.core.controller import Controller, StepContext
from metacore.core.errors import ControllerError, UsageError
from metacore.core.flat import gram_matrix
from metacore.core.hookspecs import hookimpl
from metacore.core.hparams import HParamSpace
from metacore.core.options import OptionSpec
from metacore.core.state import TrainingState
from metacore.core.values import to_float

ROLES = ("lr", "momentum", "weight_decay")
SPACE_KIND = {"lr": "log", "momentum": "logit", "weight_decay": "logshift"}
# Default step sizes β. Multiplicative: the largest change per step in the hyperparameter's own space (log / logit).
# Additive (Baydin's rule, in the hyperparameter's own units): the paper's SGD value and a scaled-down Adam value.
DEFAULT_BETA = {
    "multiplicative": {"lr": 0.1, "momentum": 0.02, "weight_decay": 0.05},
    "additive": {"sgd": {"lr": 1e-3, "momentum": 1e-3, "weight_decay": 1e-3},
                 "adam": {"lr": 1e-7, "momentum": 1e-4, "weight_decay": 1e-6},
                 "other": {"lr": 1e-3, "momentum": 1e-3, "weight_decay": 1e-3}},
}
THETA_NORM_EVERY = 16
DEFAULT_RULE = {"sgd": "multiplicative", "adam": "multiplicative", "other": "multiplicative"}


class HypergradController(Controller):
    """Online hypergradient descent (Baydin et al. 2018) on lr, momentum and weight decay."""

    name = "hypergrad"
    description = "online hypergradient descent on lr (and momentum, weight decay), any torch optimizer"
    options = {
        "adapt": OptionSpec("adapt", "lr", str, "what to adapt: comma-separated lr, momentum, weight_decay, or all"),
        "rule": OptionSpec("rule", "auto", str, "multiplicative (normalised, scale-free), additive (Baydin's), "
                           "or auto (the optimizer family's default)",
                           choices=("auto", "multiplicative", "additive")),
        "hyper_lr": OptionSpec("hyper_lr", -1.0, float, "step size β of the learning rate (-1: the rule's default)",
                               -1.0, None),
        "hyper_momentum": OptionSpec("hyper_momentum", -1.0, float, "β of momentum / Adam's beta1 (-1: default)",
                                     -1.0, None),
        "hyper_wd": OptionSpec("hyper_wd", -1.0, float, "β of weight decay (-1: default)", -1.0, None),
        "max_step": OptionSpec("max_step", 0.5, float, "largest change per step in the hyperparameter's space "
                               "(log or logit units); bounds the additive rule", 0.0, 10.0),
        "max_update": OptionSpec("max_update", 0.1, float, "trust bound: the learning rate is cut so that one step "
                                 "moves the weights by at most this fraction of their norm (0: off)", 0.0, None),
        "signal": OptionSpec("signal", "train", str, "train: the training gradient; val: every val_every steps "
                             "a validation batch's gradient instead", choices=("train", "val")),
        "val_every": OptionSpec("val_every", 10, int, "steps between validation-gradient hypergradients (signal=val)",
                                1, None),
        "tensor_lr": OptionSpec("tensor_lr", "auto", str, "hand the optimizer a device tensor as lr (no host "
                                "sync): auto (CUDA and an optimizer that takes it without a read-back), on, off",
                                choices=("auto", "on", "off")),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        roles = [r.strip() for r in self.config["adapt"].split(",") if r.strip()]
        if roles == ["all"]:
            roles = list(ROLES)
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            raise UsageError(f"option adapt for controller hypergrad: unknown {bad[0] if bad else 'empty'} value "
                             f"(known: {', '.join(ROLES)}, all)")
        self.roles = roles
        self._clear()

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _clear(self) -> None:
        self.names: dict[str, str] = {}  # role -> the task's hyperparameter name
        self.values: dict[str, Any] = {}  # role -> 0-dim tensor (after binding) or float
        self.family = ""
        self._bound = False
        self._mem: StepMemory | None = None  # θ before the last step, this step's gradient, the momentum state
        self._had_buf = False  # SGD: the last step had a momentum buffer already
        self._have_prev = False
        self._count = 0  # observed steps
        self._pending: dict[str, Any] = {}
        self._diag: dict[str, Any] = {}
        self._loaded: Mapping[str, Any] | None = None
        self._tensor_lr = False
        self._device = None
        self._theta_norm = None  # ‖θ‖ for the trust bound, refreshed every THETA_NORM_EVERY steps

    def reset(self, hparams: Mapping[str, float], seed: int, space: HParamSpace, budget: int) -> None:
        super().reset(hparams, seed, space, budget)
        self._clear()
        found = ho.role_names(space)
        if "lr" not in found:
            raise ControllerError(f"controller hypergrad needs an optimizer learning rate in {space.owner}'s "
                                  "hyperparameters (a spec writing the param-group key 'lr')")
        for role in self.roles:
            if role not in found:
                continue  # the task does not expose it; nothing to adapt
            if role == "momentum" and not hparams.get(found[role]):
                continue  # momentum 0 is a choice (logit space cannot leave 0), and SGD keeps no buffer then
            self.names[role] = found[role]
        self.values = {role: float(hparams[name]) for role, name in self.names.items()}

    def check_optimizer(self, optimizer: Any, space: HParamSpace) -> str:
        """On a registered optimizer (``--optimizer``): what this controller adapts; momentum and weight decay only
        for torch's SGD/Adam/AdamW (refused before the run starts otherwise)."""
        found = ho.role_names(space)
        extra = [r for r in self.roles if r != "lr" and r in found]
        if extra and optimizer.family == "other":
            raise UsageError(f"controller hypergrad adapts {', '.join(extra)} only on sgd, adam and adamw, not on "
                             f"optimizer {optimizer.name}; use --controller-set adapt=lr (it adapts "
                             f"{optimizer.lr_meaning})")
        return f"adapts lr ({optimizer.lr_meaning})" + (f" and {', '.join(extra)}" if extra else "")

    def act(self, state: TrainingState) -> dict[str, Any]:
        changes, self._pending = self._pending, {}
        return changes

    def on_rollback(self, hparams: Mapping[str, float]) -> None:
        """The trainer restored a snapshot and halved the rate: take its values and skip one hypergradient."""
        for role, name in self.names.items():
            if name in hparams:
                self.values[role] = self._as_value(role, float(hparams[name]))
        self._have_prev = False
        self._pending = {}
        self._diag["rollbacks_seen"] = self._diag.get("rollbacks_seen", 0) + 1

    def diagnostics(self) -> dict[str, Any]:
        return dict(self._diag)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self._bound:
            prev, mom = self._mem.saved()
        else:  # restored but not bound yet (no step since): hand on what was loaded
            loaded = self._loaded or {}
            prev, mom = list(loaded.get("prev", [])), list(loaded.get("mom", []))
        return {
            "values": {role: self._to_plain(v) for role, v in self.values.items()},
            "have_prev": self._have_prev, "had_buf": self._had_buf, "count": self._count,
            "prev": prev, "mom": mom,
            "diag": {k: self._to_plain(v) for k, v in self._diag.items()},
            "theta_norm": self._to_plain(self._theta_norm) if self._theta_norm is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for role, value in state.get("values", {}).items():
            if role in self.names:
                self.values[role] = self._as_value(role, float(value))
        self._have_prev = bool(state.get("have_prev", False))
        self._had_buf = bool(state.get("had_buf", False))
        self._count = int(state.get("count", 0))
        self._diag = dict(state.get("diag", {}))
        theta_norm = state.get("theta_norm")
        self._theta_norm = theta_norm.clone() if hasattr(theta_norm, "clone") else None
        self._pending = {}
        if self._bound:
            self._mem.load(state, self._have_prev)
        else:
            self._loaded = state  # bound at the first observed step, when the parameters are known

    # ------------------------------------------------------------------------------------------------ binding
    def _bind(self, ctx: StepContext) -> None:
        opt = ctx.optimizer
        self.family = ho.family(opt)
        keep_momentum = "momentum" in self.names or (
            "weight_decay" in self.names and self.family == "adam" and not ho.decoupled(opt.param_groups[0]))
        self._mem = StepMemory(opt, keep_momentum=keep_momentum)
        self._device = self._mem.device
        for role in ("momentum", "weight_decay"):
            if role in self.names and self.family == "other":
                raise ControllerError(f"controller hypergrad adapts {role} for torch.optim.SGD, Adam and AdamW only; "
                                      f"{type(opt).__name__} gets the learning rate only (adapt=lr)")
        if "momentum" in self.names and self.family == "sgd" and any(g.get("nesterov") for g in opt.param_groups):
            raise ControllerError("controller hypergrad: momentum adaptation does not support Nesterov SGD")
        if self.family == "adam" and any(g.get("amsgrad") for g in opt.param_groups) and (
                "momentum" in self.names or "weight_decay" in self.names):
            raise ControllerError("controller hypergrad: momentum/weight decay adaptation does not support amsgrad")
        mode = self.config["tensor_lr"]
        self._tensor_lr = mode == "on" or (mode == "auto" and self._device.type == "cuda" and ho.takes_tensor_lr(opt))
        self._bound = True
        self.values = {role: self._as_value(role, to_float(v)) for role, v in self.values.items()}
        if self._loaded is not None:
            self._mem.load(self._loaded, self._have_prev)
            self._loaded = None

    def _as_value(self, role: str, value: float) -> Any:
        import torch

        if not self._bound:
            return value
        dtype = torch.float64 if self._device.type == "cpu" else torch.float32
        return torch.tensor(value, dtype=dtype, device=self._device)

    def _to_plain(self, value: Any) -> Any:
        return value.detach().clone() if hasattr(value, "detach") else value

    # ------------------------------------------------------------------------------------------------ per step
    def observe_gradients(self, ctx: StepContext) -> None:
        import torch

        self._count += 1
        grad_of = None
        if self.config["signal"] == "val" and self._have_prev and self._count % self.config["val_every"] == 0:
            _, val_grads = ctx.val_loss_and_grads()  # needs autograd: outside no_grad
            by_id = {id(p): g for p, g in zip(ctx.params, val_grads, strict=True)}
            grad_of = lambda p: by_id.get(id(p))  # noqa: E731
            self._diag["val_signals"] = self._diag.get("val_signals", 0) + 1
        with torch.no_grad():
            if not self._bound:
                self._bind(ctx)
            self._observe(ctx, grad_of)

    def after_step(self, ctx: StepContext) -> None:
        """Nothing: the next step reads the change the optimizer made from the parameters themselves."""

    def _observe(self, ctx: StepContext, grad_of=None) -> None:
        import torch

        opt, mem = ctx.optimizer, self._mem
        grad_of = grad_of or (lambda p: p.grad)
        if self._have_prev:
            mem.flat_gradient([grad_of(p) for p in mem.flat_params])
            out: dict[str, tuple[Any, Any]] = {}
            # the derivatives that need θ_s (still in prev) come first; they need ‖g‖ alone
            if "weight_decay" in self.names or "momentum" in self.names:
                g_norm = torch.linalg.vector_norm(mem.grad.flat)
                params, grads, prevs = mem.with_grads(grad_of)
                if "weight_decay" in self.names:
                    out["weight_decay"] = ho.weight_decay_hypergrad(opt, self.family, mem, params, grads, prevs, g_norm,
                                                                     self._had_buf)
                if "momentum" in self.names:
                    out["momentum"] = ho.momentum_hypergrad(opt, self.family, mem, params, grads, g_norm)
            # learning rate: D = θ_s - θ_t, ∂f/∂α = -g·D/α (a parameter without a gradient has g = 0 here).
            # [g; D] is one (2, N) tensor: per group, one matrix product gives g·g, g·D and D·D in a single pass.
            mem.prev.sub_(mem.flat_params)
            h_lr = torch.zeros((), device=self._device, dtype=torch.float64)
            gram = torch.zeros((2, 2), device=self._device, dtype=torch.float64)
            for group, (a, b) in zip(opt.param_groups, mem.bounds, strict=True):
                if a == b:
                    continue
                g_gram = gram_matrix(mem.pair[:, mem.grad.offsets[a] : mem.grad.offsets[b]]).double()
                h_lr = h_lr - g_gram[0, 1] / group["lr"]
                gram = gram + g_gram
            d_norm = gram[1, 1].clamp_min(0).sqrt()
            g_norm = gram[0, 0].clamp_min(0).sqrt()
            out["lr"] = (h_lr, hm.cosine(-gram[0, 1], g_norm, d_norm))
            for role in self.names:
                self._apply_update(role, *out[role])
            self._trust_bound(opt, d_norm)
        self._had_buf = mem.capture(opt, self.family, self._had_buf)
        self._have_prev = True

    # ------------------------------------------------------------------------------------------------ updates
    def _trust_bound(self, opt: Any, d_norm: Any) -> None:
        """Cut the rate when the last step(s) moved the weights by more than ``max_update`` of their norm.

        A one-step hypergradient cannot see an instability coming (it is a curvature effect, and with momentum the
        step keeps growing at a fixed rate): with a rate far too large the loss looks fine for a few steps, then one
        step throws the weights away. The relative step ``‖θ_s - θ_t‖/‖θ_t‖`` does grow before that, so the rate
        is scaled down to keep it at the bound (``α ← α · r_max / r``), never up.
        """
        import torch

        r_max = self.config["max_update"]
        if r_max <= 0 or "lr" not in self.names:
            return
        if self._theta_norm is None or self._count % THETA_NORM_EVERY == 0:  # the weights' norm drifts slowly
            self._theta_norm = hm.norm(self._mem.flat_params).double()
        theta_norm = self._theta_norm.to(d_norm.device)
        ratio = torch.where(theta_norm > 0, d_norm / theta_norm.clamp_min(1e-30), torch.zeros_like(d_norm))
        self._diag["update_ratio"] = ratio
        lr = self.values["lr"]
        alpha_prev = torch.as_tensor(_plain_or_tensor(opt.param_groups[0]["lr"]), dtype=lr.dtype, device=lr.device)
        cap = alpha_prev * r_max / ratio.clamp_min(1e-30).to(lr.dtype)
        new = torch.where(ratio > r_max, torch.minimum(lr, cap), lr).clamp_min(self.space[self.names["lr"]].low)
        self.values["lr"] = new
        self._pending[self.names["lr"]] = new.float() if self._tensor_lr else float(new)

    def _apply_update(self, role: str, h: Any, cos: Any) -> None:
        import torch

        spec = self.space[self.names[role]]
        rule = self.config["rule"]
        if rule == "auto":
            rule = DEFAULT_RULE[self.family]
        beta = self.config[{"lr": "hyper_lr", "momentum": "hyper_momentum", "weight_decay": "hyper_wd"}[role]]
        if beta < 0:
            beta = DEFAULT_BETA["multiplicative"][role] if rule == "multiplicative" else \
                DEFAULT_BETA["additive"][self.family][role]
        value = self.values[role]
        low = spec.low
        high = spec.high if role != "momentum" else min(spec.high, 1.0 - hm.LOGIT_EPS)
        if role == "lr":
            low = max(low, 1e-12)
        new, finite = hm.update(value, h.to(value.dtype), cos.to(value.dtype), rule=rule, beta=beta,
                                kind=SPACE_KIND[role], low=low, high=high, max_log_step=self.config["max_step"])
        self.values[role] = new
        self._diag[f"hypergradient_{role}"] = h
        self._diag[f"cos_{role}"] = cos
        nonfinite = self._diag.get("nonfinite", torch.zeros((), device=self._device))
        self._diag["nonfinite"] = nonfinite + (~finite).to(nonfinite.dtype)
        if role == "lr" and self._tensor_lr:
            self._pending[self.names[role]] = new.float()
        else:
            self._pending[self.names[role]] = float(new)


# ---------------------------------------------------------------------------------------------------- helpers
def _plain_or_tensor(value: Any) -> Any:
    return value.detach() if hasattr(value, "detach") else float(value)


@hookimpl
def metacore_register_controllers(register):
    register(HypergradController)
