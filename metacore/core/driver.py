"""The controller driver: the one piece of code that speaks a controller's step protocol.

Every place that lets a controller set hyperparameters (the :class:`~metacore.core.trainer.Trainer`, the Hugging Face
callback, the gymnasium environment through the Trainer, ``metacore.testing``, a Lightning callback) holds one
:class:`ControllerDriver` and calls it at fixed points of its own loop; nothing else calls ``observe_gradients``,
``act``, ``after_step`` or ``on_rollback``, and nothing else writes a controller's values. The protocol, per optimizer
step::

    loss.backward()                        # the integration's loop
    driver.before_optimizer_step(step, epoch=..., budget=...)
        # gradient observers: observe_gradients(StepContext)   (gradients final, parameters not yet updated)
        # per-tensor rates: tensor_rates(StepContext) -> a multiplier per parameter (the parameters copied)
        # act(TrainingState) -> raw proposal -> on_proposal(raw) -> space.sanitize -> hparams -> write(changes)
    optimizer.step()
    driver.after_optimizer_step()          # per-tensor rates: each update scaled by its multiplier;
                                           # gradient observers: after_step(StepContext) (the update just made)

and, at the integration's own cadence: ``record_loss(mean)`` when a training loss is read back, ``record_eval(metrics)``
after an evaluation, ``log_metrics()`` for the ``hparam/*`` and ``controller/*`` scalars, ``rollback(hparams)`` after
restoring a snapshot, ``state_dict()`` / ``load_state_dict()`` beside the integration's checkpoint.

What an integration provides, and nothing more:

* ``params``: the trainable parameters (the driver hands those that have a gradient to an observer);
* ``optimizer``: the torch optimizer (given to observers as ``StepContext.optimizer``);
* ``write(changes)``: puts sanitized values where they act (default :func:`param_group_writer`: every param group);
* ``val_loss()``: the loss of one validation batch, with its graph (for controllers that ask for validation
  gradients); with ``model`` given, the driver runs it in eval mode and restores the mode;
* optionally ``keep()`` / ``go_back()``, where the integration can copy the model and optimizer state after a step
  and restore it (``StepContext.keep`` / ``go_back``, for controllers that explore), and each step's ``loss``.

The driver keeps the feedback a controller sees (recent logged losses, the latest validation metrics, the primary
metric's history) and builds the :class:`~metacore.core.state.TrainingState` from it, so integrations write none of
that either.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from metacore.core.controller import Controller, GradientObserver, StepContext, TensorRates
from metacore.core.errors import ControllerError
from metacore.core.hparams import HParamSpace, check_deferred
from metacore.core.state import TrainingState
from metacore.core.values import floats, to_float

if TYPE_CHECKING:  # pragma: no cover
    import torch

RECENT_LOSSES = 32  # logged loss means kept in the TrainingState


def param_group_writer(optimizer: Any, space: HParamSpace) -> Callable[[Mapping[str, Any]], None]:
    """A ``write`` that sets each ``optimizer`` hyperparameter in every param group that has its key."""

    def write(changes: Mapping[str, Any]) -> None:
        for name, value in changes.items():
            spec = space[name]
            if spec.acts_on == "optimizer":
                for group in optimizer.param_groups:
                    if spec.key in group:
                        spec.write(group, value)

    return write


class ControllerDriver:
    """Drives one controller through a training run (see the module docstring for the call order).

    ``space`` is the hyperparameter space the controller's values are checked against; ``metric``/``direction`` name
    the primary validation metric the controller sees. ``on_proposal`` (a test hook) gets every raw ``act()``
    proposal before it is sanitized. With ``write_every_step`` the driver calls ``write`` before every optimizer step,
    with the step's changes (possibly none), for integrations whose scheduler overwrites the values each step.
    """

    def __init__(self, controller: Controller, space: HParamSpace, *, params: Sequence[torch.Tensor] = (),
                 optimizer: Any = None, write: Callable[[Mapping[str, Any]], None] | None = None,
                 val_loss: Callable[[], torch.Tensor] | None = None, model: Any = None, metric: str = "loss",
                 direction: str = "min", on_proposal: Callable[[Mapping[str, Any]], None] | None = None,
                 write_every_step: bool = False, keep: Callable[[], None] | None = None,
                 go_back: Callable[[], bool] | None = None) -> None:
        self.controller = controller
        self.space = space
        self.name = controller.name or type(controller).__name__
        self.params = list(params)
        self.optimizer = optimizer
        self.write = write if write is not None else param_group_writer(optimizer, space)
        self.val_loss, self.model = val_loss, model
        self.metric, self.direction = metric, direction
        self.on_proposal = on_proposal
        self.write_every_step = write_every_step
        self.keep, self.go_back = keep, go_back
        self.observer = isinstance(controller, GradientObserver)
        self.rater = self.observer and isinstance(controller, TensorRates)
        self._scaled: tuple[list, list, list[float]] | None = None  # (params, their copies before the step, rates)
        self.hparams: dict[str, Any] = {}  # the values in force (numbers, or 0-dim tensors a controller keeps)
        self.train_losses: list[float] = []
        self.val_metrics: dict[str, float] = {}
        self.val_history: list[float] = []
        self._hp_cache: dict[str, float] = {}
        self._step_ctx: StepContext | None = None
        self._unchecked: list = []  # finiteness flags of device-tensor values, checked at the next read-back

    # ------------------------------------------------------------------------------------------------ a run
    def start(self, hparams: Mapping[str, Any], seed: int, budget: int, *, write: bool = True) -> None:
        """Start of a run: ``hparams`` are in force (written, unless ``write=False``), the controller is reset."""
        self.hparams = dict(hparams)
        if write:
            self.write(dict(self.hparams))
        self.controller.reset(dict(self.hparams), seed, self.space, budget)
        from metacore.core.checkpoint import check_checkpointable

        check_checkpointable(self.controller.state_dict())  # refused now, not when the last checkpoint loads

    def apply(self, values: Mapping[str, Any]) -> None:
        """Put values in force (already checked: a restored snapshot, the halved rate after a divergence)."""
        self.hparams.update(values)
        self.write(values)

    def before_optimizer_step(self, step: int, *, epoch: float = 0.0, budget: int = 0, rollbacks: int = 0,
                              loss: Any = None) -> dict[str, Any]:
        """Gradients are final, the parameters not yet updated: observe, act, sanitize, write. Returns the changes.
        ``loss``: this step's training loss (a 0-dim tensor, not read back), where the integration has it."""
        if self.observer:
            self._step_ctx = self.step_context(step, loss)
            self.controller.observe_gradients(self._step_ctx)
            if self.rater:
                self._scaled = self._take_rates(self._step_ctx)
        changes = self.propose(self.state(step, epoch=epoch, budget=budget, rollbacks=rollbacks))
        if changes:
            self.hparams.update(changes)
            self.write(changes)
        elif self.write_every_step:
            self.write({})
        return changes

    def step_context(self, step: int, loss: Any = None) -> StepContext:
        """What a gradient observer gets now: the parameters that have a gradient, their gradients (not copied)."""
        params = [p for p in self.params if p.grad is not None]
        return StepContext(step=step, params=params, grads=[p.grad for p in params], optimizer=self.optimizer,
                           hparams=self.hparams, val_loss_and_grads=lambda: self.val_loss_and_grads(params),
                           loss=loss, keep=self.keep, go_back=self.go_back)

    def propose(self, state: TrainingState) -> dict[str, Any]:
        """The controller's sanitized changes for ``state`` (``act()``, checked against the space), not applied."""
        raw = self.controller.act(state)
        if self.on_proposal is not None:
            self.on_proposal(raw)
        return self.space.sanitize(raw, self.name, self._unchecked) if raw else {}

    def _take_rates(self, ctx: StepContext) -> tuple[list, list, list[float]] | None:
        """The controller's per-tensor rates for this step, with a copy of each parameter whose rate is not 1."""
        rates = self.controller.tensor_rates(ctx)
        if rates is None:
            return None
        rates = [float(r) for r in rates]
        if len(rates) != len(ctx.params):
            raise ControllerError(f"controller {self.name!r}: tensor_rates() gave {len(rates)} rates for "
                                  f"{len(ctx.params)} parameters")
        if not all(math.isfinite(r) and r >= 0 for r in rates):
            raise ControllerError(f"controller {self.name!r}: tensor_rates() must be finite and >= 0")
        picked = [(p, r) for p, r in zip(ctx.params, rates, strict=True) if r != 1.0]
        if not picked:
            return None
        params = [p for p, _ in picked]
        return params, [p.detach().clone() for p in params], [r for _, r in picked]

    def _apply_rates(self) -> None:
        """Each rated parameter becomes ``before + rate * (after - before)``: its update scaled."""
        import torch

        params, before, rates = self._scaled
        self._scaled = None
        with torch.no_grad():
            for p, b, r in zip(params, before, rates, strict=True):
                p.sub_(b).mul_(r).add_(b)

    def after_optimizer_step(self) -> None:
        """The optimizer has stepped: per-tensor rates scale the updates, then a gradient observer sees them."""
        if self._scaled is not None:
            self._apply_rates()
        if self._step_ctx is not None:
            self.controller.after_step(self._step_ctx)
            self._step_ctx = None

    def rollback(self, hparams: Mapping[str, Any], controller_state: Mapping[str, Any] | None = None, *,
                 notify: bool = True) -> None:
        """After a divergence: the controller's state from the snapshot, ``hparams`` in force, and (``notify``) the
        controller told (``on_rollback``) which values it now starts from."""
        if controller_state is not None:
            self.controller.load_state_dict(controller_state)
        self.apply(hparams)
        if notify:
            self.controller.on_rollback(floats(hparams))

    def sibling(self, controller: Controller, *,
                on_proposal: Callable[[Mapping[str, Any]], None] | None = None) -> ControllerDriver:
        """A driver for another controller over the same parameters, optimizer, validation batches, values and
        feedback, that writes nothing: to ask what a controller would do at this point of a run (contract tests)."""
        other = ControllerDriver(controller, self.space, params=self.params, optimizer=self.optimizer,
                                 write=lambda changes: None, val_loss=self.val_loss, model=self.model,
                                 metric=self.metric, direction=self.direction, on_proposal=on_proposal)
        other.hparams = dict(self.hparams)
        other.train_losses, other.val_history = list(self.train_losses), list(self.val_history)
        other.val_metrics = dict(self.val_metrics)
        return other

    # ------------------------------------------------------------------------------------------------ feedback
    def record_loss(self, mean_loss: float) -> None:
        """A training loss read back (a logging interval's mean): the controller sees the recent ones."""
        if math.isfinite(mean_loss):
            self.train_losses = (self.train_losses + [float(mean_loss)])[-RECENT_LOSSES:]

    def record_eval(self, metrics: Mapping[str, float]) -> None:
        """Validation metrics of an evaluation: the latest ones, and the primary metric's history."""
        self.val_metrics = dict(metrics)
        if self.metric in self.val_metrics:
            self.val_history.append(self.val_metrics[self.metric])

    def state(self, step: int, *, epoch: float = 0.0, budget: int = 0, rollbacks: int = 0) -> TrainingState:
        """What the controller sees before this step."""
        return TrainingState(
            step=step, epoch=epoch, budget=budget,
            train_loss=self.train_losses[-1] if self.train_losses else math.nan,
            train_losses=tuple(self.train_losses), val_metrics=dict(self.val_metrics),
            hparams=self.hparam_floats(), primary_metric=self.metric, direction=self.direction,
            val_history=tuple(self.val_history), rollbacks=rollbacks)

    def hparam_floats(self, refresh: bool = False) -> dict[str, float]:
        """The values in force as floats. A value kept as a tensor on an accelerator (a hypergradient rate) is read
        back once, then only when ``refresh`` (at logging intervals): every step would be a host sync per step."""
        if refresh:
            self._hp_cache = floats(self.hparams)
            return dict(self._hp_cache)
        out = {}
        for k, v in self.hparams.items():
            device = getattr(v, "device", None)
            if device is not None and device.type != "cpu" and k in self._hp_cache:
                out[k] = self._hp_cache[k]
            else:
                out[k] = self._hp_cache[k] = to_float(v)
        return out

    def log_metrics(self) -> dict[str, float]:
        """``hparam/<name>`` and ``controller/<diagnostic>`` as floats (reads tensors back: call at log intervals)."""
        check_deferred(self._unchecked, self.name)  # a non-finite device value is refused like a float
        metrics = {f"hparam/{k}": v for k, v in self.hparam_floats(refresh=True).items()}
        metrics.update({f"controller/{k}": to_float(v) for k, v in self.controller.diagnostics().items()})
        return metrics

    def val_loss_and_grads(self, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss and gradients of one validation batch w.r.t. ``params``, leaving every ``.grad`` untouched."""
        import torch

        if self.val_loss is None:
            raise ControllerError(f"controller {self.name} asks for validation gradients, but this integration "
                                  "gives no validation batches")
        model = self.model
        was_training = model.training if model is not None else None
        if model is not None:
            model.eval()
        try:
            loss = self.val_loss()
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        finally:
            if model is not None:
                model.train(was_training)
        return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The controller's state, the values in force and the feedback, as tensors and plain values."""
        return {"controller": self.controller.state_dict(), "hparams": floats(self.hparams),
                "train_losses": list(self.train_losses), "val_metrics": dict(self.val_metrics),
                "val_history": list(self.val_history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the controller's state, the values (checked and written), the feedback."""
        self.controller.load_state_dict(state["controller"])
        self.apply(self.space.sanitize(dict(state["hparams"]), self.name))
        self.train_losses = list(state.get("train_losses", []))
        self.val_metrics = dict(state.get("val_metrics", {}))
        self.val_history = list(state.get("val_history", []))
