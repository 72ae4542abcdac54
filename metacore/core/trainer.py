"""The one training loop, used by ``metacore run`` and driven step-wise by the gymnasium environment.

Each step: draw the next batch of the seed's data order, forward, backward, let a gradient-observing controller see
the gradients, ask the controller for changes (validated against the task's space, applied to every param group),
``optimizer.step()``. The loss stays on the device and is read back (``.item()``, a GPU sync) only at logging
intervals; that is also where divergence is detected: a non-finite or exploding mean loss restores the last
in-memory snapshot, halves the learning rate and records the event, and repeated failures end the run as diverged.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from metacore.core.controller import Controller
from metacore.core.driver import ControllerDriver, param_group_writer
from metacore.core.state import TrainingState
from metacore.core.task import Task, TaskContext, TaskData
from metacore.core.values import floats, to_float

if TYPE_CHECKING:  # pragma: no cover
    from metacore.core.tracking import Tracker


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


@dataclass
class _Snapshot:
    step: int
    model: dict
    optimizer: dict
    controller: dict
    hparams: dict


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
        self.log_floor = -1  # after a resume: steps up to here are already in the store, not logged again
        self.space = task.hparam_space()
        self._initial_hparams: dict[str, Any] = dict(hparams)
        self.tracker, self.run_id, self.on_log = tracker, run_id, on_log
        self.step = 0
        self.epoch = 0
        self.pos = 0  # examples consumed in the current epoch
        self.best: dict[str, float] = {}
        self.rollbacks = 0
        self.extra_passes = 0  # forward/backward passes beyond the training steps' own (validation gradients)
        self._kept: dict | None = None  # a controller's in-memory copy of model and optimizer (StepContext.keep)
        self._pending: str | None = None  # "keep" or "go_back", carried out right after this step
        self.diverged = False
        self.wall_s = 0.0
        self._first_loss: float | None = None
        self._last_val_step = -1
        self._perm = None
        self._perm_epoch = -1
        self._setup(data)

    # ------------------------------------------------------------------------------------------------ set-up
    def _setup(self, data: TaskData | None) -> None:
        import numpy as np
        import torch

        seed = self.ctx.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
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
        self.driver.start(self._initial_hparams, seed, self.config.budget)
        self._loss_sum = torch.zeros((), device=self.ctx.device)
        self._loss_n = 0
        self._interval_start = time.perf_counter()
        self._interval_steps = 0
        self._snapshot = self._take_snapshot()

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
    def done(self) -> bool:
        return self.diverged or self.step >= self.config.budget

    # ------------------------------------------------------------------------------------------------ the loop
    @property
    def hparams(self) -> Mapping[str, Any]:
        """The hyperparameters in force (read-only; the driver writes them)."""
        return self.driver.hparams

    @property
    def train_losses(self) -> list[float]:
        return self.driver.train_losses

    @property
    def val_metrics(self) -> dict[str, float]:
        return self.driver.val_metrics

    @property
    def val_history(self) -> list[float]:
        return self.driver.val_history

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
        self.driver.before_optimizer_step(self.step, epoch=self.epoch_float, budget=self.config.budget,
                                          rollbacks=self.rollbacks, loss=loss.detach())
        opt.step()
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
            self._kept = {"model": _clone(self.model.state_dict()), "optimizer": _clone(self.optimizer.state_dict())}
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
        if self._first_loss is None and math.isfinite(mean_loss):
            self._first_loss = max(abs(mean_loss), 1e-8)
        exploded = self._first_loss is not None and abs(mean_loss) > self.config.explode_factor * self._first_loss
        if not math.isfinite(mean_loss) or exploded:
            self._rollback()
            return
        self.driver.record_loss(mean_loss)
        self._log({"train/loss": mean_loss, "system/step_time_ms": step_ms, **self.driver.log_metrics()})
        self._snapshot = self._take_snapshot()
        if self.on_log:
            self.on_log(self.step)

    def _log(self, metrics: Mapping[str, float]) -> None:
        if self.tracker is not None and self.run_id is not None and self.step > self.log_floor:
            self.tracker.log_metrics(self.run_id, metrics, self.step)

    def evaluate(self, split: str = "val") -> dict[str, float]:
        import torch

        self.model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.task.evaluate(self.model, self.data, split, self.ctx)
        self.model.train()
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
    def _take_snapshot(self) -> _Snapshot:
        return _Snapshot(step=self.step, model=_clone(self.model.state_dict()),
                         optimizer=_clone(self.optimizer.state_dict()),
                         controller=_clone(self.controller.state_dict()), hparams=dict(self.hparams))

    def _rollback(self) -> None:
        """Restore the last good snapshot, halve the learning rate, count it; too many: the run has diverged."""
        self.rollbacks += 1
        self._log({"controller/rollbacks": float(self.rollbacks)})
        snap = self._snapshot
        self.model.load_state_dict(snap.model)
        self.optimizer.load_state_dict(snap.optimizer)
        hparams = dict(snap.hparams)
        if self.rollbacks > self.config.max_rollbacks:  # give up; the last good weights are what gets evaluated
            self.diverged = True
            self.driver.rollback(hparams, snap.controller, notify=False)
            return
        if self.config.lr_name in self.space:
            spec = self.space[self.config.lr_name]
            hparams[spec.name] = spec.clip(to_float(hparams[spec.name]) * 0.5)
        self.driver.rollback(hparams, snap.controller)
        self._snapshot = self._take_snapshot()

    # ------------------------------------------------------------------------------------------------ the end
    def finish(self) -> RunResult:
        """Final validation and test evaluation, final checkpoint, the result.

        After a divergence the model is the last good snapshot, so the reported metrics are finite.
        """
        final: dict[str, float] = {}
        val = self.val_metrics if self._last_val_step == self.step else self.evaluate("val")
        final.update({f"val/{k}": v for k, v in val.items()})
        final.update({f"test/{k}": v for k, v in self.evaluate("test").items()})
        if self.train_losses:
            final["train/loss"] = self.train_losses[-1]
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
        import numpy as np
        import torch

        np_state = np.random.get_state()
        payload = {
            "step": self.step, "epoch": self.epoch, "pos": self.pos,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            **self.driver.state_dict(),  # controller, hparams, train_losses, val_metrics, val_history
            "best": dict(self.best), "rollbacks": self.rollbacks,
            "extra_passes": self.extra_passes, "kept": self._kept,
            "wall_s": self.wall_s, "first_loss": self._first_loss, "last_val_step": self._last_val_step,
            "loss_sum": self._loss_sum.detach().cpu(), "loss_n": self._loss_n, "diverged": self.diverged,
            "rng": {"python": _python_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                            *np_state[2:]],
                    "torch": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            payload["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return payload

    def save_checkpoint(self) -> Path:
        """Write a checkpoint; the tracker is flushed first so the store holds every step up to this one."""
        from metacore.core.checkpoint import save_checkpoint

        if self.tracker is not None and self.run_id is not None:
            self.tracker.flush(self.run_id)
        return save_checkpoint(self.checkpoint_payload(), self.config.checkpoint_dir, self.step)

    def restore(self, payload: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimizer, controller, hyperparameters, data position, every RNG."""
        import numpy as np
        import torch

        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.driver.load_state_dict(payload)
        self.step, self.epoch, self.pos = int(payload["step"]), int(payload["epoch"]), int(payload["pos"])
        self.best = dict(payload["best"])
        self.rollbacks = int(payload["rollbacks"])
        self.extra_passes = int(payload.get("extra_passes", 0))
        self._kept = payload.get("kept")
        self.diverged = bool(payload.get("diverged", False))
        self.wall_s = float(payload["wall_s"])
        self._first_loss = payload["first_loss"]
        self._last_val_step = int(payload.get("last_val_step", -1))
        self._loss_sum = payload["loss_sum"].to(self.ctx.device)
        self._loss_n = int(payload["loss_n"])
        rng = payload["rng"]
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        np_state = rng["numpy"]
        np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._snapshot = self._take_snapshot()


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _clone(obj: Any) -> Any:
    """Deep copy of a state dict, tensors cloned on their device (a snapshot, not a checkpoint). Walks dicts, lists
    and tuples itself: ``copy.deepcopy`` costs far more Python per tensor, and this runs every logging interval."""
    if hasattr(obj, "detach") and hasattr(obj, "clone"):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, _clone(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module's state dict carries its version metadata
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_clone(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return copy.deepcopy(obj)
