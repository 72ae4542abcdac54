"""Lightning integration: any metacore controller sets a ``lightning.pytorch.Trainer``'s hyperparameters.

    from metacore.integrations.lightning import MetacoreCallback

    trainer = L.Trainer(max_epochs=20, callbacks=[MetacoreCallback("hypergrad", monitor="val_loss")])

The callback holds one :class:`~metacore.core.driver.ControllerDriver` (the code that speaks the controller protocol
for the metacore Trainer and the Hugging Face callback too) and calls it at these points of Lightning's automatic
optimization (``lightning.pytorch.loops.optimization.automatic``, the precision plugins)::

    training_step -> backward (accumulated) -> [fp16: unscale] -> on_before_optimizer_step -> clip gradients
        -> optimizer.step() -> optimizer step post-hook -> lr_scheduler.step() -> on_train_batch_end -> log

* ``on_before_optimizer_step``: the gradients are accumulated over ``accumulate_grad_batches`` and unscaled (the
  ``16-mixed`` plugin unscales them before this hook), the parameters not yet updated. The scheduler's values are
  kept aside, the controller's values in force are written (a gradient observer reads the rate the previous step
  used), then the driver lets the controller observe, act, and writes its sanitized changes.
* Gradient clipping (``gradient_clip_val``) runs after this hook: the controller sees the loss's gradient, the
  optimizer applies the clipped one, and ``after_step`` sees the update that was made.
* A torch step post-hook on the optimizer: ``after_step``, then the scheduler's own values go back into the groups,
  so Lightning's ``lr_scheduler.step()`` continues the schedule undisturbed. ``schedule="override"`` (default): the
  controller's rate is the one used; ``schedule="scale"``: the controller's value relative to its initial value
  multiplies the schedule's (the same meaning as the Hugging Face callback's).
* ``on_train_batch_end``: the training loss is summed on the device and read back at Lightning's logging interval
  (``log_every_n_steps``), where ``hparam/<name>`` and ``controller/<name>`` are logged through the module
  (``LightningModule.log``), so every logger (``MLFlowLogger``, TensorBoard, CSV) has them at the losses' steps.
* ``on_validation_end``: the metric named by ``monitor`` (as the module logged it) is the controller's primary one.
* ``state_dict`` / ``load_state_dict``: the driver's state (tensors and plain values) in Lightning's checkpoint, so
  ``trainer.fit(ckpt_path=...)`` continues the controller where it stopped.

Manual optimization is refused: Lightning does not own the step there. This module imports ``lightning`` at import
time (it subclasses ``Callback``); nothing in the CLI or the plugins imports it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from typing import Any, Callable, Iterator, Mapping

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # the optional extra is not installed
    raise ImportError('metacore.integrations.lightning needs Lightning 2.x: pip install "metacore[lightning]" '
                      '(or pip install "lightning>=2.1,<3")') from exc

from metacore.core.driver import ControllerDriver
from metacore.core.errors import ControllerError, UsageError
from metacore.core.hparams import HParamSpace
from metacore.core.values import to_float
from metacore.integrations.optimizer_groups import (
    SCHEDULE_MODES,
    ScheduledGroups,
    make_controller,
    optimizer_hparam_space,
)

OWN_PREFIXES = ("hparam/", "controller/")  # what this callback logs; never fed back as validation metrics


class MetacoreCallback(Callback):
    """Let a metacore controller set a Lightning Trainer's hyperparameters before every optimizer step.

    ``controller`` is a registered name (``metacore list controllers``), a :class:`~metacore.Controller` subclass or
    an instance; ``options`` are its options (as ``--controller-set``), validated. ``schedule``: ``"override"`` or
    ``"scale"`` (see the module docstring). ``monitor``/``direction``: the validation metric the module logs that the
    controller sees as its primary one. ``bounds`` overrides the default bounds (``{"lr": (1e-5, 1.0)}``), ``space``
    replaces the whole space. ``val_loss(module, batch) -> loss`` computes a validation batch's loss for controllers
    that ask for validation gradients (default: the module's ``training_step`` on the batch, its logging silenced);
    the batches come from the Trainer's validation loader (the datamodule's ``val_dataloader``). ``seed`` defaults
    to the one ``lightning.seed_everything`` set.
    """

    def __init__(self, controller: Any = "hypergrad", *, schedule: str = "override", monitor: str = "val_loss",
                 direction: str = "min", bounds: Mapping[str, tuple[float, float]] | None = None,
                 space: HParamSpace | None = None, val_loss: Callable[[Any, Any], Any] | None = None,
                 seed: int | None = None, registry: Any = None, **options: Any) -> None:
        if schedule not in SCHEDULE_MODES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULE_MODES)}, got {schedule!r}")
        if direction not in ("min", "max"):
            raise UsageError(f"direction must be 'min' or 'max', got {direction!r}")
        self.controller = make_controller(controller, options, registry)
        self.schedule, self.monitor, self.direction = schedule, monitor, direction
        self.bounds, self.space, self.seed = dict(bounds or {}), space, seed
        self.val_loss = val_loss
        self.driver: ControllerDriver | None = None
        self.groups: ScheduledGroups | None = None
        self.history: list[tuple[int, dict[str, float]]] = []  # (global step, values that step used)
        self._restored: Mapping[str, Any] | None = None
        self._hooks: list[Any] = []
        self._val_batches: Iterator[Any] | None = None
        self._loss_sum: Any = None
        self._loss_n = 0
        self._stepped = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(controller=self.controller.name or type(self.controller).__name__)

    # ------------------------------------------------------------------------------------------------ set-up
    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise UsageError("MetacoreCallback does not support manual optimization (automatic_optimization=False): "
                             "the callback sets the hyperparameters around the optimizer step that Lightning owns; "
                             "use automatic optimization, or drive the controller with metacore.core.driver")

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        self.space = self.space or optimizer_hparam_space(optimizer, self.bounds)
        self.groups = ScheduledGroups(optimizer, self.space, self.schedule)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.driver = ControllerDriver(
            self.controller, self.space, params=params, optimizer=optimizer,
            write=lambda changes: self.groups.write(changes),
            val_loss=lambda: self._val_loss(trainer, pl_module), model=pl_module,
            metric=self.monitor, direction=self.direction)
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.driver.start(self.space.defaults(), seed, _budget(trainer), write=False)
        if self._restored is not None:  # trainer.fit(ckpt_path=...): continue the controller saved with it
            self.driver.load_state_dict(self._restored)
            self._restored = None
        self._hooks = [optimizer.register_step_post_hook(self._after_step)]

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------------------------------------ each step
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.driver is None:
            return
        self._stepped = True
        self.groups.before_step(self.driver.hparams)
        self.driver.before_optimizer_step(trainer.global_step, epoch=_epoch(trainer), budget=_budget(trainer))
        self.history.append((trainer.global_step, self.driver.hparam_floats()
                             | {"lr_used": _host_float(self.groups.groups[0]["lr"])}))

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.driver.after_optimizer_step()
        self.groups.after_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.driver is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None and hasattr(loss, "detach"):  # Lightning divides it by accumulate_grad_batches
            loss = loss.detach() * trainer.accumulate_grad_batches
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_n += 1
        stepped, self._stepped = self._stepped, False  # not every batch steps under gradient accumulation
        every = trainer.log_every_n_steps
        if not (every and stepped and trainer.global_step % every == 0):
            return
        if self._loss_n:  # the one host read-back of a logging interval
            self.driver.record_loss(to_float(self._loss_sum) / self._loss_n)
            self._loss_sum, self._loss_n = None, 0
        metrics = {k: v for k, v in self.driver.log_metrics().items() if math.isfinite(v)}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------------------------------------ feedback
    def on_validation_end(self, trainer, pl_module) -> None:
        if self.driver is None or trainer.sanity_checking:
            return
        metrics = {k: to_float(v) for k, v in trainer.callback_metrics.items()
                   if not k.startswith(OWN_PREFIXES) and getattr(v, "numel", lambda: 1)() == 1}
        if self.monitor not in metrics:
            raise ControllerError(f"MetacoreCallback(monitor={self.monitor!r}): the module logged no such metric; "
                                  f"it logged: {', '.join(sorted(metrics)) or 'nothing'}")
        self.driver.record_eval(metrics)

    def _val_loss(self, trainer, pl_module):
        """The loss of the next validation batch (the validation loader, cycled), with its graph."""
        import torch

        if self._val_batches is None:
            self._val_batches = itertools.cycle(_val_loader(trainer, self.controller.name))
        batch = trainer.strategy.batch_to_device(next(self._val_batches))
        with torch.enable_grad(), trainer.precision_plugin.forward_context():
            if self.val_loss is not None:
                return self.val_loss(pl_module, batch)
            with _silenced(pl_module):
                out = pl_module.training_step(batch, 0)
        return out["loss"] if isinstance(out, Mapping) else out

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.driver is None:
            return dict(self._restored or {})
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._restored = state_dict  # applied at on_train_start, once the optimizer and the controller exist


def _budget(trainer) -> int:
    steps = trainer.estimated_stepping_batches
    return int(steps) if math.isfinite(steps) else 0


def _epoch(trainer) -> float:
    per_epoch = trainer.num_training_batches
    done = trainer.fit_loop.epoch_loop.batch_idx + 1
    return trainer.current_epoch + (done / per_epoch if per_epoch and math.isfinite(per_epoch) else 0.0)


def _host_float(value: Any) -> float:
    """A float from a number or a CPU tensor; NaN for a tensor on an accelerator (no host sync per step)."""
    device = getattr(value, "device", None)
    return math.nan if device is not None and device.type != "cpu" else to_float(value)


def _val_loader(trainer, controller: str):
    loaders = trainer.val_dataloaders
    if loaders is None and trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ControllerError(f"controller {controller} asks for validation gradients but the Trainer has no "
                              "validation loader yet: fit with a datamodule that has val_dataloader(), or pass "
                              "val_dataloaders and leave the sanity check on (num_sanity_val_steps > 0)")
    return loaders


@contextlib.contextmanager
def _silenced(module):
    """The module's ``log`` / ``log_dict`` do nothing (a validation batch through ``training_step`` logs no
    training metrics)."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict
