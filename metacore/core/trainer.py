"""The one training loop, used by ``metacore run`` and driven step-wise by the gymnasium environment.

Each step: draw the next batch of the seed's data order, forward, backward, hand over to the controller driver
(:mod:`metacore.core.driver`: observe the gradients, act, sanitize, write), ``optimizer.step()``, the driver again.
The loss stays on the device and is read back (``.item()``, a GPU sync) only at logging intervals; that is also where
the divergence guard (:mod:`metacore.core.guard`) looks: a non-finite or exploding mean loss restores the last
in-memory snapshot with the learning rate halved, and repeated failures end the run as diverged. What a checkpoint
holds is composed here from the parts' own state (the driver's, the guard's, every RNG: :mod:`metacore.core.rng`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from metacore.core.controller import Controller
from metacore.core.driver import ControllerDriver, param_group_writer
from metacore.core.errors import ControllerFailed
from metacore.core.guard import DivergenceGuard, clone_state
from metacore.core.state import TrainingState
from metacore.core.task import Task, TaskContext, TaskData
from metacore.core.values import floats, to_float

if TYPE_CHECKING:  # pragma: no cover
    from metacore.core.store import Tracker


@dataclass
class RunResult:
    steps: int
    wall_s: float
    final: dict[str, float]
    best: dict[str, float]
    hparams_final: dict[str, float]
    diverged: bool
    rollbacks: int
    compute_ratio: float = 1.0  # forward/backward passes over a static run's with the same steps


@dataclass
class TrainerConfig:
    budget: int
    log_interval: int = 10
    eval_interval: int = 100
    checkpoint_interval: int = 0
    checkpoint_dir: Path | None = None
    max_rollbacks: int = 5
    explode_factor: float = 1e3  # a logged mean loss this many times the first one counts as divergence
    lr_name: str = "lr"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA when the task declares it safe; "fp32": never
    compile: bool = False  # train through torch.compile(model); state dicts and evaluation use the model itself


class Trainer:
    """Trains one model with one controller. ``advance(n)`` runs n steps and returns the state; ``run()`` all."""

    def __init__(self, task: Task, controller: Controller, ctx: TaskContext, hparams: Mapping[str, float],
                 config: TrainerConfig, *, data: TaskData | None = None, tracker: Tracker | None = None,
                 run_id: str | None = None, on_log: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_proposal: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        self.task, self.controller, self.ctx, self.config = task, controller, ctx, config
        self.should_stop = should_stop or (lambda: False)
        self._on_proposal = on_proposal  # a test hook: every raw act() proposal, before it is sanitized
        self._log_floor = -1  # after a resume: steps up to here are already in the store, not logged again
        self.space = task.hparam_space()
        self._initial_hparams: dict[str, Any] = dict(hparams)
        self.tracker, self.run_id, self.on_log = tracker, run_id, on_log
        self.step = 0
        self.epoch = 0
        self.pos = 0  # examples consumed in the current epoch
        self.best: dict[str, float] = {}
        self.extra_passes = 0  # forward/backward passes beyond the training steps' own (validation gradients)
        self._kept: dict | None = None  # a controller's in-memory copy of model and optimizer (StepContext.keep)
        self._pending: str | None = None  # "keep" or "go_back", carried out right after this step
        self.wall_s = 0.0
        self.guard = DivergenceGuard(self.space, explode_factor=config.explode_factor,
                                     max_rollbacks=config.max_rollbacks, lr_name=config.lr_name)
        self._last_val_step = -1
        self._perm = None
        self._perm_epoch = -1
        self._setup(data)

    # ------------------------------------------------------------------------------------------------ set-up
    def _setup(self, data: TaskData | None) -> None:
        import torch

        from metacore.core.rng import seed_everything

        seed = self.ctx.seed
        seed_everything(seed)
        self.data = data if data is not None else self.task.load_data(self.ctx)
        torch.manual_seed(seed)  # the model's initial weights depend on the seed only, not on data loading
        self.model = self.task.build_model(self.data, self.ctx).to(self.ctx.device)
        self.optimizer = self.task.build_optimizer(self.model, self._initial_hparams, self.ctx)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._train_model = torch.compile(self.model) if self.config.compile else self.model
        self._bf16 = (self.config.precision == "auto" and self.task.bf16_autocast
                      and str(self.ctx.device).startswith("cuda") and torch.cuda.is_bf16_supported())
        self._write_groups = param_group_writer(self.optimizer, self.space)
        self.driver = ControllerDriver(
            self.controller, self.space, params=self.params, optimizer=self.optimizer, write=self._write,
            val_loss=self._val_loss, model=self.model, metric=self.task.primary_metric,
            direction=self.task.direction, on_proposal=self._on_proposal, keep=self._request_keep,
            go_back=self._request_go_back)
        with self._blame_controller(at_start=True):  # reset, and its first state_dict() checked
            self.driver.start(self._initial_hparams, seed, self.config.budget)
        self._loss_sum = torch.zeros((), device=self.ctx.device)
        self._loss_n = 0
        self._interval_start = time.perf_counter()
        self._interval_steps = 0
        self._remember()

    # ------------------------------------------------------------------------------------------------ data order
    def _next_indices(self, batch_size: int):
        import torch

        n = self.data.train_size
        batch_size = max(1, min(int(batch_size), n))
        if self.pos + batch_size > n:  # drop the last partial batch, start the next epoch
            self.epoch += 1
            self.pos = 0
        if self._perm_epoch != self.epoch:
            gen = torch.Generator().manual_seed(self.ctx.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(n, generator=gen)
            self._perm_epoch = self.epoch
        indices = self._perm[self.pos : self.pos + batch_size]
        self.pos += batch_size
        return indices

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.pos / max(1, self.data.train_size)

    @property
    def rollbacks(self) -> int:
        return self.guard.rollbacks

    @property
    def diverged(self) -> bool:
        return self.guard.diverged

    @property
    def done(self) -> bool:
        return self.diverged or self.step >= self.config.budget

    # ------------------------------------------------------------------------------------------------ the loop
    @property
    def hparams(self) -> Mapping[str, Any]:
        """The hyperparameters in force (read-only; the driver writes them)."""
        return self.driver.hparams

    @property
    def val_metrics(self) -> dict[str, float]:
        """The latest validation metrics (the driver keeps them, with the losses the controller sees)."""
        return self.driver.val_metrics

    def state(self) -> TrainingState:
        return self.driver.state(self.step, epoch=self.epoch_float, budget=self.config.budget,
                                 rollbacks=self.rollbacks)

    def advance(self, n: int) -> TrainingState:
        """Run up to ``n`` optimizer steps (fewer at the end of the budget) and return the state."""
        start = time.perf_counter()
        for _ in range(n):
            if self.done or self.should_stop():
                break
            self._train_step()
        self.wall_s += time.perf_counter() - start
        return self.state()

    def run(self) -> RunResult:
        self.advance(self.config.budget - self.step)
        return self.finish()

    def _train_step(self) -> None:
        opt = self.optimizer
        loss = self._backward(self._next_indices(self.hparams.get("batch_size", 32)))
        with self._blame_controller():
            self.driver.before_optimizer_step(self.step, epoch=self.epoch_float, budget=self.config.budget,
                                              rollbacks=self.rollbacks, loss=loss.detach())
        opt.step()
        with self._blame_controller():
            self.driver.after_optimizer_step()
        if self._pending:
            self._keep_or_go_back()
        self._loss_sum += loss.detach()
        self._loss_n += 1
        self._interval_steps += 1
        self.step += 1
        if self.step % self.config.log_interval == 0 or self.step >= self.config.budget:
            self._log_interval()
        if not self.diverged and self.step % self.config.eval_interval == 0 and self.step < self.config.budget:
            self.evaluate("val")
        ci = self.config.checkpoint_interval
        if ci and self.config.checkpoint_dir and self.step % ci == 0 and self.step < self.config.budget:
            self.save_checkpoint()

    @contextlib.contextmanager
    def _blame_controller(self, at_start: bool = False):
        """An exception raised by (or a value refused from) the controller becomes :class:`ControllerFailed`,
        naming the controller and the step, so the run can end FAILED with that message. Assertions pass through as
        they are: they are a test's (the ``on_proposal`` hook of the contract tests), not the controller's result."""
        try:
            yield
        except (ControllerFailed, KeyboardInterrupt, AssertionError):
            raise
        except Exception as exc:
            raise ControllerFailed(self.driver.name, self.step, exc, at_start=at_start) from exc

    def _request_keep(self) -> None:
        self._pending = "keep"

    def _request_go_back(self) -> bool:
        if self._kept is None:
            return False
        self._pending = "go_back"
        return True

    def _keep_or_go_back(self) -> None:
        """A controller's request, after the step: copy model and optimizer state, or restore the copy."""
        if self._pending == "keep":
            self._kept = {"model": clone_state(self.model.state_dict()),
                          "optimizer": clone_state(self.optimizer.state_dict())}
        elif self._kept is not None:
            self.model.load_state_dict(self._kept["model"])
            self.optimizer.load_state_dict(self._kept["optimizer"])
            self._write(dict(self.hparams))  # the optimizer's groups keep the rates in force, not the copy's
            self._kept = None  # one way back per copy; it is not carried in later checkpoints
        self._pending = None

    def _backward(self, indices):
        """Forward and backward the training examples ``indices``; the loss stays on the device."""
        model = self.model
        batch = self.task.train_batch(self.data, indices, self.ctx)
        if not model.training:  # evaluation switches to eval and back; a per-step train() walks every module
            model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.task.loss(self._train_model, batch)
        loss.backward()
        return loss

    def compute_gradients(self):
        """Forward and backward the first training examples (one batch) without stepping or moving the data order:
        the gradients a gradient observer would see now, for probing a controller (``metacore.testing``)."""
        import torch

        self._backward(torch.arange(min(int(self.hparams.get("batch_size", 32)), self.data.train_size)))

    def _val_loss(self):
        """The loss of one validation batch drawn from the seed and the step (the driver takes its gradients)."""
        import torch

        self.extra_passes += 1
        val = self.data.val
        n = int(val[0].shape[0])
        gen = torch.Generator().manual_seed(self.ctx.seed * 7919 + self.step)
        bs = int(min(n, self.hparams.get("batch_size", 32)))
        idx = torch.randperm(n, generator=gen)[:bs]
        batch = tuple(t[idx].to(self.ctx.device, non_blocking=True) for t in val)
        with self._autocast():
            return self.task.loss(self.model, batch)

    def _autocast(self):
        """bf16 autocast on CUDA for tasks that declare it safe (``precision="auto"``), else nothing."""
        if not self._bf16:
            return contextlib.nullcontext()
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16)

    def _write(self, changes: Mapping[str, Any]) -> None:
        """Write hyperparameters where they act: every optimizer param group, the model (the data pipeline reads
        ``hparams`` itself)."""
        self._write_groups(changes)
        for name, value in changes.items():
            if self.space[name].acts_on == "model":
                self.task.apply_model_hparam(self.model, name, to_float(value))

    # ------------------------------------------------------------------------------------------------ logging
    def _log_interval(self) -> None:
        mean_loss = self._loss_sum.item() / max(1, self._loss_n)  # the one host sync of an interval
        elapsed = time.perf_counter() - self._interval_start
        step_ms = 1000.0 * elapsed / max(1, self._interval_steps)
        self._loss_sum.zero_()
        self._loss_n = 0
        self._interval_start = time.perf_counter()
        self._interval_steps = 0
        if self.guard.diverging(mean_loss):
            self._rollback()
            return
        self.driver.record_loss(mean_loss)
        with self._blame_controller():  # diagnostics, and the deferred finiteness check of device values
            controller_metrics = self.driver.log_metrics()
        self._log({"train/loss": mean_loss, "system/step_time_ms": step_ms, **controller_metrics,
                   **self.task.optimizer_metrics(self.optimizer)})
        self._remember()
        if self.on_log:
            self.on_log(self.step)

    def _log(self, metrics: Mapping[str, float]) -> None:
        if self.tracker is not None and self.run_id is not None and self.step > self._log_floor:
            self.tracker.log_metrics(self.run_id, metrics, self.step)

    def evaluate(self, split: str = "val", *, record: bool = True) -> dict[str, float]:
        """Evaluate the model on ``split``; ``record=False``: only return the metrics (no log, no history)."""
        import torch

        self.model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(self.model, self.data, split, self.ctx)
        self.model.train()
        if not record:
            return metrics
        if split == "val":
            self._last_val_step = self.step
            self.driver.record_eval(metrics)
            for name, value in metrics.items():
                better = max if self.task.metrics.get(name, "max") == "max" else min
                key = f"val/{name}"
                self.best[key] = better(self.best.get(key, value), value)
        self._log({f"{split}/{k}": v for k, v in metrics.items()})
        return metrics

    # ------------------------------------------------------------------------------------------------ divergence
    def _remember(self) -> None:
        self.guard.remember(self.step, self.model, self.optimizer, self.controller.state_dict(), self.hparams)

    def _rollback(self) -> None:
        """Restore the last good snapshot with the learning rate halved; too many: the run has diverged."""
        back = self.guard.roll_back(self.model, self.optimizer)
        self._log({"controller/rollbacks": float(self.rollbacks)})
        self.driver.rollback(back.hparams, back.controller, notify=not back.gave_up)
        if not back.gave_up:
            self._remember()

    # ------------------------------------------------------------------------------------------------ the end
    def finish(self) -> RunResult:
        """Final validation and test evaluation, final checkpoint, the result.

        After a divergence the model is the last good snapshot, so the reported metrics are finite.
        """
        final: dict[str, float] = {}
        val = self.val_metrics if self._last_val_step == self.step else self.evaluate("val")
        final.update({f"val/{k}": v for k, v in val.items()})
        final.update({f"test/{k}": v for k, v in self.evaluate("test").items()})
        if self.driver.train_losses:
            final["train/loss"] = self.driver.train_losses[-1]
        self._log({"system/compute_ratio": self.compute_ratio})
        if self.config.checkpoint_dir:
            self.save_checkpoint()
        if self.tracker is not None and self.run_id is not None:
            self.tracker.flush(self.run_id)
        hparams_final = {k: int(v) if self.space[k].integer else v for k, v in floats(self.hparams).items()}
        return RunResult(steps=self.step, wall_s=round(self.wall_s, 3), final=final, best=dict(self.best),
                         hparams_final=hparams_final,
                         diverged=self.diverged, rollbacks=self.rollbacks, compute_ratio=self.compute_ratio)

    @property
    def compute_ratio(self) -> float:
        """Forward/backward passes of this run so far over a static run's with the same steps (evaluation passes,
        which every run makes alike, are not counted)."""
        return round((self.step + self.extra_passes) / max(1, self.step), 4)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (keys: :data:`metacore.core.checkpoint.PAYLOAD_KEYS`)."""
        from metacore.core.rng import capture_rng

        return {
            "step": self.step, "epoch": self.epoch, "pos": self.pos,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            **self.driver.state_dict(),  # controller, hparams, train_losses, val_metrics, val_history
            **self.guard.state_dict(),  # first_loss, rollbacks, diverged
            "best": dict(self.best), "wall_s": self.wall_s, "last_val_step": self._last_val_step,
            "extra_passes": self.extra_passes, "kept": self._kept,
            "loss_sum": self._loss_sum.detach().cpu(), "loss_n": self._loss_n, "rng": capture_rng(),
            "undelivered": self.tracker.undelivered(self.run_id) if self.tracker is not None and self.run_id else [],
        }

    def save_checkpoint(self) -> Path:
        """Write a checkpoint; the tracker is flushed first so the store holds every step up to this one."""
        from metacore.core.checkpoint import save_checkpoint

        if self.tracker is not None and self.run_id is not None:
            self.tracker.flush(self.run_id)
        return save_checkpoint(self.checkpoint_payload(), self.config.checkpoint_dir, self.step)

    def restore(self, payload: Mapping[str, Any], *, logged_until: int = -1) -> None:
        """Continue from a checkpoint: weights, optimizer, controller, hyperparameters, data position, every RNG.

        ``logged_until``: the last step the store already holds for this run; metrics up to it are not logged again.
        """
        from metacore.core.checkpoint import check_payload
        from metacore.core.rng import restore_rng

        check_payload(payload)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.driver.load_state_dict(payload)
        self.guard.load_state_dict(payload)
        self.step, self.epoch, self.pos = int(payload["step"]), int(payload["epoch"]), int(payload["pos"])
        self.best = dict(payload["best"])
        self.extra_passes = int(payload.get("extra_passes", 0))
        self._kept = payload.get("kept")
        self.wall_s = float(payload["wall_s"])
        self._last_val_step = int(payload.get("last_val_step", -1))
        self._loss_sum = payload["loss_sum"].to(self.ctx.device)
        self._loss_n = int(payload["loss_n"])
        self._log_floor = int(logged_until)
        restore_rng(payload["rng"])
        self._remember()
