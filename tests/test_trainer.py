import math

import pytest

from metacore import Controller
from metacore.core.registry import load_registry
from metacore.core.task import TaskContext
from metacore.core.trainer import Trainer, TrainerConfig


def make_trainer(controller, steps=30, tracker=None, seed=0, run_id="r", **cfg):
    task = load_registry(entry_points=False).task("digits").obj()
    preset = task.preset("smoke")
    hparams = task.hparam_space().defaults()
    ctx = TaskContext(preset, task.resolve_options(preset, {}), seed, "cpu", None, dict(hparams))
    config = TrainerConfig(budget=steps, log_interval=cfg.pop("log_interval", 5), eval_interval=10, **cfg)
    return Trainer(task, controller, ctx, hparams, config, tracker=tracker, run_id=run_id if tracker else None)


class Recorder(Controller):
    name = "recorder"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def act(self, state):
        self.seen.append(state)
        return {}


class SetAt(Controller):
    """Sets hyperparameters at chosen steps."""

    name = "set-at"

    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def act(self, state):
        return self.plan.get(state.step, {})


def test_same_seed_same_result_and_stepwise_equals_run():
    a = make_trainer(Recorder()).run()
    t = make_trainer(Recorder())
    while not t.done:
        t.advance(7)
    b = t.finish()
    assert a.final == b.final and a.final["val/accuracy"] > 0


def test_different_seed_changes_the_run():
    a = make_trainer(Recorder(), seed=0).run()
    b = make_trainer(Recorder(), seed=1).run()
    assert a.final != b.final


def test_controller_sees_frozen_scalar_state_every_step():
    c = Recorder()
    make_trainer(c, steps=12).run()
    assert [s.step for s in c.seen] == list(range(12))
    last = c.seen[-1]
    assert last.budget == 12 and 0 < last.progress < 1
    assert math.isfinite(last.train_loss) and len(last.train_losses) == 2  # logged at steps 5 and 10
    assert "accuracy" in last.val_metrics  # evaluated at step 10
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        last.step = 3  # frozen
    assert all(isinstance(v, float) for v in last.hparams.values())


def test_changes_reach_every_param_group_and_are_clipped():
    t = make_trainer(SetAt({3: {"lr": 0.05, "momentum": 5.0}}), steps=6)
    t.run()
    for group in t.optimizer.param_groups:
        assert group["lr"] == 0.05 and group["momentum"] == 0.999
    assert t.hparams["lr"] == 0.05


def test_metrics_logged_step_indexed(memory_tracker):
    rid = memory_tracker.start_run("e", "r")
    make_trainer(Recorder(), steps=20, tracker=memory_tracker, run_id=rid).run()
    hist = memory_tracker.runs[rid]["metrics"]
    assert [s for s, _ in hist["train/loss"]] == [5, 10, 15, 20]
    assert [s for s, _ in hist["hparam/lr"]] == [5, 10, 15, 20]
    assert [s for s, _ in hist["val/accuracy"]] == [10, 20]
    assert [s for s, _ in hist["test/accuracy"]] == [20]
    assert "system/step_time_ms" in hist


def test_nonfinite_loss_rolls_back_and_halves_lr(memory_tracker):
    rid = memory_tracker.start_run("e", "r")
    t = make_trainer(SetAt({6: {"lr": 100.0}}), steps=20, tracker=memory_tracker, run_id=rid)
    result = t.run()
    assert result.rollbacks == 1 and not result.diverged
    assert result.hparams_final["lr"] == pytest.approx(0.005)  # the snapshot's 0.01, halved
    assert all(math.isfinite(v) for v in result.final.values())
    assert memory_tracker.history(rid, "controller/rollbacks") == [(10, 1.0)]


def test_repeated_divergence_ends_the_run_as_diverged():
    class Reckless(Controller):
        name = "reckless"

        def act(self, state):
            return {"lr": 100.0}

    result = make_trainer(Reckless(), steps=60, max_rollbacks=2).run()
    assert result.diverged and result.rollbacks == 3
    assert result.steps < 60
    # the last good weights are evaluated: never a NaN reported as a result
    assert result.final and all(math.isfinite(v) for v in result.final.values())


def test_val_loss_and_grads_leave_training_grads_alone():
    t = make_trainer(Recorder(), steps=1)
    t.advance(1)
    for p in t.params:
        p.grad = None
    loss, grads = t.driver.val_loss_and_grads(t.params)
    assert math.isfinite(loss.item()) and len(grads) == len(t.params)
    assert all(p.grad is None for p in t.params)


class KeepThenGoBack(Controller):
    """Keeps the weights after step 4, goes back to them after step 9, and records the step losses it sees."""

    name = "keep-go-back"

    def __init__(self):
        super().__init__()
        self.losses, self.answers = [], []

    def observe_gradients(self, ctx):
        self.losses.append(float(ctx.loss))

    def after_step(self, ctx):
        if ctx.step == 4:
            ctx.keep()
        elif ctx.step in (9, 12):
            self.answers.append(ctx.go_back())


def test_keep_and_go_back_restore_model_and_optimizer_after_the_step():
    import torch

    ctl = KeepThenGoBack()
    t = make_trainer(ctl, steps=15)
    t.advance(5)
    kept = {k: v.clone() for k, v in t.model.state_dict().items()}
    kept_momentum = [t.optimizer.state[p]["momentum_buffer"].clone() for p in t.params]
    t.advance(4)
    assert any(not torch.equal(kept[k], v) for k, v in t.model.state_dict().items())
    t.advance(1)
    for k, v in t.model.state_dict().items():  # after step 9 the weights are those after step 4 again
        assert torch.equal(kept[k], v), k
    for p, m in zip(t.params, kept_momentum, strict=True):
        assert torch.equal(t.optimizer.state[p]["momentum_buffer"], m)
    t.run()
    assert ctl.answers == [True, False]  # one way back per copy
    assert len(ctl.losses) == 15 and all(math.isfinite(v) for v in ctl.losses)
    assert t.compute_ratio == 1.0  # going back costs steps of the budget, not extra passes


def test_compute_ratio_counts_validation_gradient_passes():
    class ValEveryOther(Controller):
        name = "val-every-other"

        def observe_gradients(self, ctx):
            if ctx.step % 2 == 0:
                ctx.val_loss_and_grads()

        def after_step(self, ctx):
            pass

    t = make_trainer(ValEveryOther(), steps=10)
    result = t.run()
    assert result.compute_ratio == pytest.approx(1.5)
