"""Hugging Face ``Trainer`` integration: any metacore controller drives a ``transformers.Trainer``'s optimizer.

    from metacore.integrations.huggingface import MetacoreCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[MetacoreCallback("hypergrad", hyper_lr=1e-3)])

Where each controller call happens in Trainer's step (``transformers.Trainer._inner_training_loop``)::

    backward (accumulated) -> clip -> on_pre_optimizer_step -> optimizer.step() -> on_optimizer_step
                           -> lr_scheduler.step() -> on_step_end -> log (on_log)

* ``on_pre_optimizer_step``: the gradients are final (accumulated and clipped), the parameters not yet updated. A
  gradient-observing controller (``hypergrad``) sees them here (``observe_gradients``), then ``act`` decides, and the
  controller's values are written into every param group, right before ``optimizer.step()``.
* ``on_optimizer_step``: ``after_step`` (the update the optimizer just made), then each group's learning rate is put
  back to the value the scheduler had set, so the scheduler's own (possibly recursive) schedule is never disturbed.
* Trainer calls its scheduler after every optimizer step, which would overwrite the controller's learning rate. It
  cannot: the controller's value is rewritten before every step. With ``schedule="override"`` (default) the
  controller owns the learning rate and the schedule is ignored; with ``schedule="scale"`` the controller's value
  is relative to its initial value and multiplies the schedule's (warmup and decay keep their shape).
* The learning rate Trainer logs (``learning_rate``, read from the scheduler's ``get_last_lr()`` just after the step)
  is the one the optimizer used: the callback sets the scheduler's last value to it. The hyperparameter trajectory
  (``hparam/<name>``) and the controller's diagnostics (``controller/<name>``) are added to Trainer's logs (its
  ``log_history``, and the logs later callbacks see), and sent to MLflow when MLflow is a reporter of the Trainer.

The controller's state is saved beside each Trainer checkpoint (``metacore_controller.pt``) and restored when Trainer
resumes from it.

Param groups keep their ratios: Trainer puts biases and norms in a group without weight decay, and a group whose
initial value of a key is 0 while another group's is not stays at 0.

This module imports ``transformers`` at import time (it subclasses ``TrainerCallback``); nothing in the CLI or the
plugins imports it.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from transformers import TrainerCallback

from metacore.core.controller import Controller
from metacore.core.driver import ControllerDriver
from metacore.core.errors import ControllerError, UsageError
from metacore.core.hparams import HParamSpace
from metacore.core.values import floats, to_float
from metacore.integrations.optimizer_groups import (
    SCHEDULE_MODES,
    ScheduledGroups,
    inner_optimizer,
    make_controller,
    optimizer_hparam_space,  # noqa: F401  (importable from here too)
)

STATE_FILE = "metacore_controller.pt"  # saved in each Trainer checkpoint folder


class MetacoreCallback(TrainerCallback):
    """Let a metacore controller set a ``transformers.Trainer``'s hyperparameters before every optimizer step.

    ``controller`` is a registered name (``metacore list controllers``), a :class:`~metacore.Controller` subclass or
    an instance; ``options`` are its options (as ``--controller-set``), validated. ``schedule`` is ``"override"``
    (the controller's learning rate is used as is) or ``"scale"`` (relative to its initial value, times the
    schedule's). ``bounds`` overrides the default bounds (``{"lr": (1e-6, 1e-3)}``), ``space`` replaces the whole
    hyperparameter space. ``metric``/``direction`` name the evaluation metric a controller sees as its primary one
    (``eval_`` prefix stripped). ``val_data`` is an iterable of model-input batches (a ``DataLoader`` over the eval
    set), cycled, for controllers that ask for validation gradients.
    """

    def __init__(self, controller: str | type[Controller] | Controller = "hypergrad", *, schedule: str = "override",
                 bounds: Mapping[str, tuple[float, float]] | None = None, space: HParamSpace | None = None,
                 metric: str = "loss", direction: str = "min", val_data: Iterable[Mapping[str, Any]] | None = None,
                 registry: Any = None, **options: Any) -> None:
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            import transformers

            raise UsageError(f"MetacoreCallback needs a transformers whose TrainerCallback has on_pre_optimizer_step "
                             f"(this one is {transformers.__version__}); upgrade transformers")
        if schedule not in SCHEDULE_MODES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULE_MODES)}, got {schedule!r}")
        if direction not in ("min", "max"):
            raise UsageError(f"direction must be 'min' or 'max', got {direction!r}")
        self.controller = make_controller(controller, options, registry)
        self.schedule = schedule
        self.bounds = dict(bounds or {})
        self.space: HParamSpace | None = space
        self.metric, self.direction = metric, direction
        self.val_data = val_data
        self.driver: ControllerDriver | None = None  # made at on_train_begin, when the optimizer exists
        self.history: list[tuple[int, dict[str, float]]] = []  # (global step, values the optimizer used)
        self.groups: ScheduledGroups | None = None
        self._model: Any = None
        self._val_iter: Any = None
        self._started = False

    @property
    def hparams(self) -> dict[str, Any]:
        """The controller's values in force (empty before training starts); the feedback it has seen is the
        driver's (``callback.driver.train_losses``, ``.val_metrics``, ``.val_history``)."""
        return self.driver.hparams if self.driver is not None else {}

    # ------------------------------------------------------------------------------------------------ set-up
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None:
            raise ControllerError("MetacoreCallback: the Trainer has no optimizer at on_train_begin")
        self.space = self.space or optimizer_hparam_space(optimizer, self.bounds)
        self.groups = ScheduledGroups(optimizer, self.space, self.schedule)
        groups = self.groups.groups
        self._model = kwargs.get("model")
        self.driver = ControllerDriver(
            self.controller, self.space, params=[p for g in groups for p in g["params"] if p.requires_grad],
            optimizer=inner_optimizer(optimizer), write=lambda changes: self.groups.write(changes),
            val_loss=self._val_loss, model=self._model, metric=self.metric, direction=self.direction)
        self.driver.start(self.space.defaults(), int(args.seed), int(state.max_steps), write=False)
        self._started = True
        if state.global_step > 0:  # Trainer resumed from a checkpoint: continue the controller saved with it
            self._load(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE)

    def on_save(self, args, state, control, **kwargs):
        """Save the controller beside Trainer's checkpoint, so ``train(resume_from_checkpoint=...)`` continues it."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not self._started or not state.is_world_process_zero or not folder.is_dir():
            return
        import torch

        torch.save(self.driver.state_dict(), folder / STATE_FILE)

    def _load(self, path: Path) -> None:
        import torch

        if not path.is_file():
            return  # a checkpoint written without this callback: the controller starts afresh
        self.driver.load_state_dict(torch.load(path, weights_only=True))

    # ------------------------------------------------------------------------------------------------ each step
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if not self._started:
            return
        self.groups.before_step(self.hparams)  # the scheduler's values kept aside, the controller's in force
        if model is not None:
            self._model = self.driver.model = model
        self.driver.before_optimizer_step(int(state.global_step), epoch=float(state.epoch or 0.0),
                                          budget=int(state.max_steps))  # observe, act, sanitize, write the groups
        used = to_float(self.groups.groups[0]["lr"])
        self.history.append((state.global_step, floats(self.hparams) | {"lr_used": used}))
        scheduler = kwargs.get("lr_scheduler")
        target = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it
        if target is not None and hasattr(target, "_last_lr"):
            target._last_lr = [g["lr"] for g in self.groups.groups]  # so Trainer logs the learning rate actually used

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self._started:
            return
        self.driver.after_optimizer_step()
        self.groups.after_step()  # the scheduler continues from its own values

    def _val_loss(self):
        """The loss of the next ``val_data`` batch (cycled); the driver takes its gradients in eval mode."""
        if self.val_data is None:
            raise ControllerError(f"controller {self.controller.name} asks for validation gradients: pass "
                                  "MetacoreCallback(..., val_data=<an iterable of model-input batches>)")
        if self._val_iter is None:
            self._val_iter = itertools.cycle(self.val_data)
        params = self.driver.params
        device = params[0].device if params else "cpu"
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in next(self._val_iter).items()}
        out = self._model(**batch)
        return out["loss"] if isinstance(out, Mapping) or hasattr(out, "keys") else out[0]

    # ------------------------------------------------------------------------------------------------ feedback, logs
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.driver is None:
            return
        self.driver.record_eval({k.removeprefix("eval_"): float(v) for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._started or logs is None or not ("loss" in logs or "learning_rate" in logs):
            return  # only training logs (not evaluation metrics, not the end-of-training summary)
        if isinstance(logs.get("loss"), (int, float)):
            self.driver.record_loss(float(logs["loss"]))
        extra = self.driver.log_metrics()
        logs.update(extra)  # callbacks after this one see them
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # Trainer appended this entry just before calling on_log
        if "mlflow" in (args.report_to or []):
            _log_to_mlflow(extra, state.global_step)


def _log_to_mlflow(metrics: Mapping[str, float], step: int) -> None:
    """Into the run Trainer's ``MLflowCallback`` opened (it runs before user callbacks, so it is active)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
