"""The math of the hypergradient controller: one-step derivatives of the loss with respect to the hyperparameters
of the previous optimizer step, and the update rules that move those hyperparameters.

Notation (step ``t`` is the one whose gradient was just computed, ``s = t - 1`` the previous optimizer step):

* ``θ_s`` the parameters before step ``s``; ``θ_t`` after it; ``D = θ_s - θ_t`` (what the step removed).
* ``g = ∇f(θ_t)``: the gradient of the task's loss ``f`` at ``θ_t``, exactly what ``backward()`` left in ``.grad``
  (torch adds L2 weight decay inside ``optimizer.step()``, never into ``.grad``), or, with ``signal=val``, the gradient
  of a validation batch's loss. It is always the gradient of the *unregularised* loss: the hypergradient asks how the
  task's loss responds, and a weight-decay term in the objective would make ``λ = 0`` trivially optimal.
* ``α, μ, λ``: learning rate, momentum (``β1`` for Adam), weight decay used by step ``s``.

Learning rate (any optimizer whose step is linear in ``α``: SGD with or without momentum/Nesterov, Adam, AdamW,
RMSprop, ...): ``θ_t = θ_s - α u`` where ``u`` does not depend on ``α``, so ``∂θ_t/∂α = -u = -D/α`` and

    ∂f(θ_t)/∂α = -g·u = -(g·D)/α.

``u`` is derived from the parameter change the optimizer actually made, so no per-optimizer code is needed: plain
SGD gives ``u = ∇f(θ_s)`` (Baydin et al.'s ``-∇f_t·∇f_{t-1}``), momentum SGD the momentum buffer, Adam
``m̂/(√v̂+ε)``, AdamW that plus ``λθ_s``.

Momentum, SGD (``buf_s = μ buf_{s-1} + (1-d)(∇f(θ_s) + λθ_s)``, ``θ_t = θ_s - α buf_s``)::

    ∂θ_t/∂μ = -α buf_{s-1}                  ->   ∂f/∂μ = -α g·buf_{s-1}

(zero on the step that creates the buffer). ``buf_{s-1}`` is the optimizer's buffer as it was before step ``s``:
this needs one more parameter-sized copy, kept only when momentum is adapted.

β1, Adam/AdamW (``m_s = β1 m_{s-1} + (1-β1) g̃_s``, ``m̂ = m/(1-β1^k)``, ``θ_t = θ_s - α m̂_s/(√v̂_s+ε)``)::

    ∂m̂_s/∂β1 = (m_{s-1} - g̃_s)/(1-β1^k) + m_s k β1^(k-1)/(1-β1^k)²
    ∂θ_t/∂β1 = -α (∂m̂_s/∂β1) / (√v̂_s+ε)

with ``g̃_s = (m_s - β1 m_{s-1})/(1-β1)`` recovered from the two first moments (again one copy, of ``m_{s-1}``).

Weight decay, SGD (coupled L2: ``d_s = ∇f(θ_s) + λθ_s``) and AdamW (decoupled: ``θ_t = θ_s(1-αλ) - α m̂/(√v̂+ε)``)::

    ∂θ_t/∂λ = -α c θ_s                      ->   ∂f/∂λ = -α c g·θ_s

with ``c = 1`` for AdamW and SGD without momentum; for SGD with momentum ``c = 1-d`` (``1`` on the buffer's first
step), and with Nesterov ``c' = 1 + μc``. ``θ_s`` is the copy the learning-rate derivative keeps anyway. Weight decay,
Adam with coupled L2 (``g̃ = ∇f + λθ``, which enters both moments)::

    ∂θ_t/∂λ = -α [ (1-β1) θ_s / ((1-β1^k)(√v̂+ε)) - m̂ (1-β2) g̃_s θ_s / ((1-β2^k) √v̂ (√v̂+ε)²) ]

Update rules (``h`` a derivative above, ``S`` its sensitivity vector ``∂θ_t/∂η``):

* additive (Baydin et al. 2018): ``η ← η - β h``. Scale-dependent: ``β`` must match the size of ``g·u``.
* multiplicative (normalised): ``z ← z - β cos(g, S)`` where ``cos = h/(‖g‖‖S‖) ∈ [-1, 1]`` and ``z`` is the
  hyperparameter in its own space: ``log α`` for the learning rate, ``logit μ`` for momentum, ``log(λ + λ0)`` for
  weight decay. Scale-free: ``β`` is the largest change per step in that space, whatever the model or optimizer.

Every result is clamped into the task's bounds; a non-finite derivative leaves the value unchanged (and is counted),
so the rate can never become negative, zero or NaN.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

WD_SHIFT = 1e-5  # λ0 of the weight-decay space log(λ + λ0): lets λ reach 0 and move up from it
LOGIT_EPS = 1e-6


# ------------------------------------------------------------------------------------------------ vector helpers
def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ a_i·b_i over lists of tensors, as a 0-dim tensor on their device (no host sync)."""
    import torch

    if not a:
        return torch.zeros(())
    return torch.stack([torch.dot(*_same_dtype(x.reshape(-1), y.reshape(-1))) for x, y in zip(a, b, strict=True)]).sum()


def _same_dtype(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.dot`` wants one dtype: a half-precision gradient meets a float32 flat-buffer view."""
    import torch

    if x.dtype == y.dtype:
        return x, y
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors, fused (``torch._foreach_norm``)."""
    import torch

    if not a:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(a)))


def cosine(d: torch.Tensor, na: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
    """``d / (na nb)``, 0 where either norm is 0 (no direction, no information)."""
    import torch

    denom = na * nb
    return torch.where(denom > 0, d / denom.clamp_min(1e-30), torch.zeros_like(d))


# ------------------------------------------------------------------------------------------------ sensitivities
def sgd_wd_coefficient(momentum: float, dampening: float, nesterov: bool, had_buffer: bool) -> float:
    """``c`` in ``∂θ_t/∂λ = -α c θ_s`` for torch's SGD (see the module docstring)."""
    if momentum == 0:
        return 1.0
    c = (1.0 - dampening) if had_buffer else 1.0
    return 1.0 + momentum * c if nesterov else c


def adam_beta1_sensitivity(m_prev: Sequence[torch.Tensor], m: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                           k: float, beta1: float, beta2: float, eps: float, lr: float) -> list[torch.Tensor]:
    """``∂θ_t/∂β1`` per parameter for Adam/AdamW (module docstring); ``m_prev`` is the first moment before step s."""
    import torch

    bc1 = 1.0 - beta1**k
    bc2 = 1.0 - beta2**k
    # g̃_s = (m - β1 m_prev)/(1-β1);  m_prev - g̃_s = (m_prev - m)/(1-β1)
    diff = torch._foreach_sub(m_prev, m)
    torch._foreach_mul_(diff, 1.0 / ((1.0 - beta1) * bc1))
    torch._foreach_add_(diff, m, alpha=k * beta1 ** (k - 1) / bc1**2)  # ∂m̂/∂β1
    denom = torch._foreach_sqrt(v)
    torch._foreach_mul_(denom, 1.0 / math.sqrt(bc2))
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(diff, denom)
    torch._foreach_mul_(diff, -lr)
    return diff


def adam_l2_sensitivity(theta_prev: Sequence[torch.Tensor], m_prev: Sequence[torch.Tensor],
                        m: Sequence[torch.Tensor], v: Sequence[torch.Tensor], k: float, beta1: float, beta2: float,
                        eps: float, lr: float) -> list[torch.Tensor]:
    """``∂θ_t/∂λ`` per parameter for Adam with coupled L2 weight decay (module docstring)."""
    import torch

    bc1 = 1.0 - beta1**k
    bc2 = 1.0 - beta2**k
    g_tilde = torch._foreach_mul(m_prev, -beta1)
    torch._foreach_add_(g_tilde, m)
    torch._foreach_mul_(g_tilde, 1.0 / (1.0 - beta1))
    sqrt_vhat = torch._foreach_sqrt(v)
    torch._foreach_mul_(sqrt_vhat, 1.0 / math.sqrt(bc2))
    denom = torch._foreach_add(sqrt_vhat, eps)
    # first term: (1-β1) θ_s / (bc1 D)
    first = torch._foreach_div(theta_prev, denom)
    torch._foreach_mul_(first, (1.0 - beta1) / bc1)
    # second term: m̂ (1-β2) g̃ θ_s / (bc2 √v̂ D²); where √v̂ = 0, g̃ = 0 too, so the clamp only avoids 0/0
    second = torch._foreach_mul(m, g_tilde)
    torch._foreach_mul_(second, theta_prev)
    torch._foreach_div_(second, torch._foreach_clamp_min(sqrt_vhat, 1e-30))
    torch._foreach_div_(second, torch._foreach_mul(denom, denom))
    torch._foreach_mul_(second, (1.0 - beta2) / (bc1 * bc2))
    torch._foreach_sub_(first, second)
    torch._foreach_mul_(first, -lr)
    return first


# ------------------------------------------------------------------------------------------------ update rules
def to_space(kind: str, value: torch.Tensor) -> torch.Tensor:
    """The space a hyperparameter moves in: ``log`` (learning rate), ``logit`` (momentum), ``logshift`` (decay)."""
    import torch

    if kind == "log":
        return torch.log(value)
    if kind == "logit":
        v = value.clamp(LOGIT_EPS, 1.0 - LOGIT_EPS)
        return torch.log(v) - torch.log1p(-v)
    if kind == "logshift":
        return torch.log(value + WD_SHIFT)
    raise ValueError(kind)


def from_space(kind: str, z: torch.Tensor) -> torch.Tensor:
    import torch

    if kind == "log":
        return torch.exp(z)
    if kind == "logit":
        return torch.sigmoid(z)
    if kind == "logshift":
        return (torch.exp(z) - WD_SHIFT).clamp_min(0.0)
    raise ValueError(kind)


def space_derivative(kind: str, value: torch.Tensor) -> torch.Tensor:
    """``dη/dz``: turns ``∂f/∂η`` into ``∂f/∂z`` (the additive rule in the hyperparameter's own space)."""
    if kind == "log":
        return value
    if kind == "logit":
        return value * (1.0 - value)
    if kind == "logshift":
        return value + WD_SHIFT
    raise ValueError(kind)


def update(value: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, *, rule: str, beta: float, kind: str,
           low: float, high: float, max_log_step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One hypergradient step of a hyperparameter; returns ``(new value, finite flag)``. No host sync.

    ``multiplicative``: ``z ← z - β cos`` in the hyperparameter's space. ``additive``: ``η ← η - β h`` (Baydin's rule),
    then limited to a change of ``max_log_step`` in that space per step, which is what keeps one huge hypergradient
    from throwing the rate to a bound. A non-finite ``h`` or ``cos`` keeps the value; bounds always hold.
    """
    import torch

    finite = torch.isfinite(h) & torch.isfinite(cos)
    z = to_space(kind, value)
    if rule == "multiplicative":
        z_new = z - beta * torch.where(finite, cos, torch.zeros_like(cos))
    else:
        step = beta * torch.where(finite, h, torch.zeros_like(h))
        candidate = value - step
        if kind == "log":  # an additive step past zero would leave the log space: take the largest allowed cut
            candidate = torch.where(candidate > 0, candidate, value * math.exp(-max_log_step))
        z_new = to_space(kind, candidate.clamp(max(low, 0.0), high) if kind != "log" else candidate)
    z_new = torch.where(torch.isfinite(z_new), z_new, z)
    z_new = z + (z_new - z).clamp(-max_log_step, max_log_step)
    new = from_space(kind, z_new).clamp(low, high)
    new = torch.where(torch.isfinite(new) & finite, new, value)
    return new, finite
