"""The trainer's collaborators on their own: the divergence guard, RNG capture/restore, checkpoint payload checks."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from metacore.core.checkpoint import OPTIONAL_KEYS, PAYLOAD_KEYS, check_payload
from metacore.core.errors import CheckpointError
from metacore.core.guard import DivergenceGuard, clone_state
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.rng import capture_rng, restore_rng, seed_everything

SPACE = HParamSpace([HParamSpec("lr", 0.1, 1e-4, 1.0, log=True), HParamSpec("momentum", 0.9, 0.0, 0.99)])


def _model_and_optimizer():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_guard_flags_non_finite_and_exploding_losses_against_the_first_finite_one():
    guard = DivergenceGuard(SPACE, explode_factor=10.0)
    assert guard.diverging(float("nan")) and guard.first_loss is None  # a NaN diverges before any finite loss
    guard = DivergenceGuard(SPACE, explode_factor=10.0)
    assert not guard.diverging(2.0) and guard.first_loss == 2.0
    assert not guard.diverging(19.0)
    assert guard.diverging(21.0) and guard.diverging(float("inf")) and guard.diverging(float("nan"))


def test_guard_restores_the_snapshot_halves_lr_and_gives_up_after_max_rollbacks():
    model, opt = _model_and_optimizer()
    guard = DivergenceGuard(SPACE, max_rollbacks=2)
    weights = clone_state(model.state_dict())
    guard.remember(4, model, opt, {"k": torch.tensor(1.0)}, {"lr": 0.1, "momentum": 0.9})
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    back = guard.roll_back(model, opt)
    assert torch.equal(model.weight, weights["weight"]) and not back.gave_up
    assert back.hparams == {"lr": pytest.approx(0.05), "momentum": 0.9} and float(back.controller["k"]) == 1.0
    assert guard.rollbacks == 1 and not guard.diverged
    guard.roll_back(model, opt)
    last = guard.roll_back(model, opt)
    assert last.gave_up and guard.diverged and guard.rollbacks == 3
    assert last.hparams["lr"] == 0.1  # giving up: the snapshot's values, not halved
    restored = DivergenceGuard(SPACE)
    restored.load_state_dict(guard.state_dict())
    assert (restored.rollbacks, restored.diverged, restored.first_loss) == (3, True, None)


def test_guard_snapshot_is_a_copy_not_a_view():
    model, opt = _model_and_optimizer()
    guard = DivergenceGuard(SPACE)
    guard.remember(0, model, opt, {}, {"lr": 0.1})
    with torch.no_grad():
        model.bias.add_(1.0)
    assert not torch.equal(guard.snapshot.model["bias"], model.bias)


def test_rng_capture_and_restore_replays_every_generator():
    seed_everything(7)
    state = capture_rng()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(99)
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
    assert all(isinstance(v, (list, torch.Tensor)) for v in state.values())


def test_check_payload_says_what_an_old_or_foreign_checkpoint_lacks():
    full = {k: 0 for k in PAYLOAD_KEYS}
    check_payload(full)  # the optional keys may be missing (checkpoints from before they existed)
    assert not set(OPTIONAL_KEYS) & set(PAYLOAD_KEYS)
    partial = {k: v for k, v in full.items() if k != "rng"}
    with pytest.raises(CheckpointError, match="lacks rng"):
        check_payload(partial, "step-000000010.pt")
    with pytest.raises(CheckpointError, match="not a metacore trainer checkpoint"):
        check_payload([1, 2])


def test_a_payload_without_the_optional_keys_resumes_and_one_without_rng_exits_2_saying_why():
    from metacore.controllers.static import StaticController
    from metacore.testing import run_controller

    trainer, _ = run_controller(StaticController(), steps=12, stop_after=6)
    old = {k: v for k, v in trainer.checkpoint_payload().items() if k not in OPTIONAL_KEYS}
    fresh, _ = run_controller(StaticController(), steps=12, stop_after=0)
    fresh.restore(old)
    assert fresh.step == 6 and not fresh.diverged and math.isfinite(fresh.advance(6).train_loss)
    with pytest.raises(CheckpointError, match="lacks rng"):
        fresh.restore({k: v for k, v in old.items() if k != "rng"})


def test_each_controller_is_built_once_per_child_run(tmp_path, monkeypatch):
    from metacore.app.runner import RunRequest, execute, plan_run
    from metacore.controllers.static import StaticController
    from metacore.core.tracking import MemoryTracker
    from metacore.testing import TinyTask, make_registry

    built: list[str] = []

    class Counted(StaticController):
        name = "counted"

        def __init__(self, **options):
            super().__init__(**options)
            built.append(self.name)

    monkeypatch.chdir(tmp_path)
    registry = make_registry(TinyTask, Counted, builtins=True)
    plan = plan_run(RunRequest(task="tiny", controller="counted", baseline=None, preset="smoke", steps=4, seeds=2,
                               device="cpu"), registry)
    assert [r.role for r in plan.roles] == ["controller"] and built == ["counted"]  # validated once, kept
    summary = execute(plan, MemoryTracker())
    assert len(summary["runs"]) == 2 and built == ["counted", "counted"]  # one controller per child run
