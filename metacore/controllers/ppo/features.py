"""Task-agnostic observation features of a training run, shared by the gymnasium environment and the ``ppo`` controller.

The same :class:`FeatureTracker` computes the observation in both places, so a policy trained in the environment sees
exactly what it will see inside ``metacore run``. Every feature is scale-free (ratios in log space, cosines,
fractions) and clipped to ``[-CLIP, CLIP]``, so tasks with different losses, metrics and learning rates are comparable.

Gradient statistics are collected between ``backward()`` and ``optimizer.step()`` in two flat parameter-sized buffers
(this step's gradient and the previous one, rows of one ``(2, N)`` tensor, :mod:`metacore.core.flat`): per step one
fused copy and one ``(2, N) @ (N, 2)`` product that gives the norm and the dot product in one pass, accumulated on the
device and read back only at decision steps, so there is no per-step host sync.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from metacore.core.state import TrainingState

CLIP = 5.0
FEATURES: tuple[str, ...] = (
    "progress",            # step / budget
    "log_lr_vs_start",     # log(lr / lr at step 0)
    "log_lr_vs_default",   # log(lr / the task's default lr)
    "loss_trend",          # log(train loss now / train loss at the previous decision)
    "loss_level",          # log(train loss now / first logged train loss)
    "loss_noise",          # std of consecutive log-ratios of the recent logged train losses
    "val_trend",           # score change between the two latest evaluations
    "val_gap",             # best score so far minus the latest score (>= 0)
    "grad_norm_trend",     # log(mean grad norm over the last interval / over the first interval)
    "grad_norm_cv",        # coefficient of variation of the grad norm within the last interval
    "grad_cos",            # mean cosine of consecutive gradients within the last interval
    "rollback",            # 1 if the trainer rolled back (divergence) since the previous decision
)


def score(value: float, direction: str) -> float:
    """A scale-free score of a validation metric: ``-log(error)``.

    The error is ``1 - value`` for a metric to maximise (accuracy, F1: bounded by 1) and ``value`` itself for one to
    minimise (MAE, RMSE: bounded by 0). A change of score is the log of the error-reduction ratio, so an improvement
    on CIFAR-10 accuracy and one on electricity MAE are on the same footing.
    """
    if value is None or not math.isfinite(value):
        return 0.0
    err = 1.0 - value if direction == "max" else value
    return -math.log(max(err, 1e-4))


def _clip(x: float) -> float:
    if x is None or not math.isfinite(x):
        return 0.0
    return max(-CLIP, min(CLIP, float(x)))


def _log_ratio(a: float, b: float) -> float:
    if not (a and b) or not math.isfinite(a) or not math.isfinite(b) or a <= 0 or b <= 0:
        return 0.0
    return math.log(a / b)


class GradStats:
    """Per-interval gradient statistics on the device: norm mean and variance, cosine of consecutive gradients."""

    def __init__(self) -> None:
        self._pair = None  # (2, N): this step's gradient and the previous one, in alternating rows
        self._bufs: list[Any] = []  # a FlatBuffer over each row
        self._cur = 0  # the row the next gradient goes to
        self.acc = None  # [sum norm, sum norm^2, sum cos, n steps, n cos]
        self._prev_sq = None  # squared norm of the previous gradient; None: no previous gradient

    @property
    def prev(self) -> list[Any] | None:
        """The previous step's gradient, per tensor (views of a flat buffer), or None."""
        return list(self._bufs[1 - self._cur].views) if self._bufs and self._prev_sq is not None else None

    def set_prev(self, tensors: Sequence[Any], sq: Any) -> None:
        self._ensure(tensors)
        self._bufs[1 - self._cur].copy_(tensors)
        self._prev_sq = sq

    def _ensure(self, like: Sequence[Any]) -> None:
        from metacore.core.flat import FlatBuffer, flat_rows

        views = self._bufs[0].views if self._bufs else []
        if len(views) != len(like) or any(v.shape != t.shape for v, t in zip(views, like, strict=True)):
            self._pair = flat_rows(like, 2)
            self._bufs = [FlatBuffer(like, flat=row) for row in self._pair]
            self._cur, self._prev_sq = 0, None

    def observe(self, grads: Sequence[Any]) -> None:
        import torch

        from metacore.core.flat import gram_matrix

        grads = list(grads)
        if not grads:
            return
        self._ensure(grads)
        self._bufs[self._cur].copy_(grads)
        gram = gram_matrix(self._pair)  # on a CPU one pass: |g|^2 and g·g_prev together
        sq = gram[self._cur, self._cur]
        norm = sq.sqrt()
        if self.acc is None or self.acc.device != norm.device:
            self.acc = torch.zeros(5, device=norm.device)
        if self._prev_sq is not None:
            cos = gram[0, 1] / (norm * self._prev_sq.sqrt()).clamp_min(1e-12)
            self.acc[2] += torch.nan_to_num(cos.float(), nan=0.0)
            self.acc[4] += 1
        self._cur = 1 - self._cur
        self._prev_sq = sq
        norm = torch.nan_to_num(norm.float(), nan=0.0, posinf=0.0)
        self.acc[0] += norm
        self.acc[1] += norm * norm
        self.acc[3] += 1

    def take(self) -> dict[str, float]:
        """The statistics since the last ``take`` (one host sync), then start a new interval."""
        if self.acc is None or float(self.acc[3]) == 0:
            return {"n": 0.0, "norm_mean": 0.0, "norm_cv": 0.0, "cos": 0.0}
        s, s2, c, n, nc = (float(v) for v in self.acc.tolist())
        self.acc.zero_()
        mean = s / n
        var = max(0.0, s2 / n - mean * mean)
        return {"n": n, "norm_mean": mean, "norm_cv": math.sqrt(var) / mean if mean > 0 else 0.0,
                "cos": c / nc if nc else 0.0}


class FeatureTracker:
    """Turns a :class:`TrainingState` and the interval's gradient statistics into the observation vector."""

    def __init__(self, lr_start: float, lr_default: float) -> None:
        self.lr_start = float(lr_start)
        self.lr_default = float(lr_default)
        self.grads = GradStats()
        self.first_grad_norm = 0.0
        self.prev_loss = math.nan
        self.first_loss = math.nan
        self.rollbacks_seen = 0

    def features(self, state: TrainingState, grad: Mapping[str, float] | None = None) -> list[float]:
        grad = grad or {"n": 0.0, "norm_mean": 0.0, "norm_cv": 0.0, "cos": 0.0}
        lr = float(state.hparams.get("lr", self.lr_start))
        loss = state.train_loss
        if math.isfinite(loss) and not math.isfinite(self.first_loss):
            self.first_loss = loss
        losses = [x for x in state.train_losses[-9:] if math.isfinite(x) and x > 0]
        steps = [math.log(b / a) for a, b in zip(losses, losses[1:], strict=False)]
        noise = 0.0
        if len(steps) >= 2:
            m = sum(steps) / len(steps)
            noise = math.sqrt(sum((x - m) ** 2 for x in steps) / len(steps))
        hist = [score(v, state.direction) for v in state.val_history]
        val_trend = hist[-1] - hist[-2] if len(hist) >= 2 else 0.0
        val_gap = max(hist) - hist[-1] if hist else 0.0
        if grad["n"] and self.first_grad_norm <= 0:
            self.first_grad_norm = grad["norm_mean"]
        rollback = 1.0 if state.rollbacks > self.rollbacks_seen else 0.0
        self.rollbacks_seen = state.rollbacks
        out = [
            state.progress,
            _log_ratio(lr, self.lr_start),
            _log_ratio(lr, self.lr_default),
            _log_ratio(loss, self.prev_loss),
            _log_ratio(loss, self.first_loss),
            noise,
            val_trend,
            val_gap,
            _log_ratio(grad["norm_mean"], self.first_grad_norm) if grad["n"] else 0.0,
            grad["norm_cv"],
            grad["cos"],
            rollback,
        ]
        if math.isfinite(loss):
            self.prev_loss = loss
        return [_clip(x) for x in out]

    # what a rollback or a checkpoint restores: scalars, the interval's accumulators and the previous gradient, so a
    # restored controller computes the very same features (tensors and plain values only: loads weights_only)
    def state_dict(self) -> dict[str, Any]:
        g = self.grads
        out: dict[str, Any] = {"first_grad_norm": self.first_grad_norm, "prev_loss": self.prev_loss,
                               "first_loss": self.first_loss, "lr_start": self.lr_start,
                               "rollbacks_seen": self.rollbacks_seen}
        if g.acc is not None:
            out["grad_acc"] = g.acc.detach().clone()
        if g.prev is not None and g._prev_sq is not None:
            out["grad_prev"] = [t.detach().clone() for t in g.prev]
            out["grad_prev_sq"] = g._prev_sq.detach().clone()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.first_grad_norm = float(state.get("first_grad_norm", self.first_grad_norm))
        self.prev_loss = float(state.get("prev_loss", self.prev_loss))
        self.first_loss = float(state.get("first_loss", self.first_loss))
        self.lr_start = float(state.get("lr_start", self.lr_start))
        self.rollbacks_seen = int(state.get("rollbacks_seen", self.rollbacks_seen))
        if "grad_acc" in state:
            self.grads.acc = state["grad_acc"].clone()
        if "grad_prev" in state:
            self.grads.set_prev(state["grad_prev"], state["grad_prev_sq"].clone())
