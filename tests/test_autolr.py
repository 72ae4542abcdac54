"""``autolr``: the in-run range test stops where the loss turns up, the anneal follows the budget, the state
round-trips, a rollback ends the search, and on the real digits data it is robust to the initial rate."""

from __future__ import annotations

import math

import pytest

from metacore.controllers.autolr import AutoLRController
from metacore.core.controller import StepContext
from metacore.core.errors import ControllerError
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.state import TrainingState

SPACE = HParamSpace([HParamSpec("lr", 1e-3, 1e-8, 10.0, log=True), HParamSpec("momentum", 0.9, 0.0, 0.999)])


def _state(step, budget, lr, losses=()):
    return TrainingState(step=step, epoch=0.0, budget=budget, train_loss=losses[-1] if losses else math.nan,
                         train_losses=tuple(losses), val_metrics={}, hparams={"lr": lr, "momentum": 0.9},
                         primary_metric="accuracy", direction="max")


def _ctx(step, loss):
    return StepContext(step=step, params=[], grads=[], optimizer=None, hparams={}, val_loss_and_grads=None,
                       loss=loss)


def _drive(ctl, budget, loss_of_lr, lr0=1e-3, log_every=10):
    """Run the controller against a synthetic loss that depends on the rate in force, as the Trainer would: the
    step's loss to ``observe_gradients``, logged means (every ``log_every`` steps) in the state; return the lrs."""
    ctl.reset({"lr": lr0, "momentum": 0.9}, 0, SPACE, budget)
    lr, lrs, logged, window = lr0, [], [], []
    for step in range(budget):
        loss = loss_of_lr(lr, step)
        ctl.observe_gradients(_ctx(step, loss))
        lr = ctl.act(_state(step, budget, lr, logged)).get("lr", lr)
        lrs.append(lr)
        window.append(loss)
        if (step + 1) % log_every == 0:
            logged, window = (logged + [sum(window) / len(window)])[-32:], []
    return lrs


def _valley(best):
    """Loss falls with the rate up to ``best * 10``, then rises steeply (a range test's shape)."""
    return lambda lr, step: 2.0 - 0.1 * math.log10(min(lr, best * 10) / 1e-8) + max(0.0, math.log10(lr / (best * 10)))


def test_search_grows_stops_at_the_rise_and_backs_off():
    ctl = AutoLRController(search_frac=0.3, window=0)
    lrs = _drive(ctl, 600, _valley(0.1))
    assert ctl.phase == "anneal"
    assert ctl.search_end < 0.3 * 600
    assert lrs[0] == pytest.approx(1e-5)  # hint x start_factor
    assert all(b > a for a, b in zip(lrs[:20], lrs[1:21], strict=True))  # geometric growth
    # stopped shortly past the turn at 1.0; the peak is the stop rate / backoff
    assert 1.0 < ctl.stop_lr < 5.0
    assert ctl.peak == pytest.approx(ctl.stop_lr / 10)


@pytest.mark.parametrize("lr0", [1e-4, 1e-2, 1.0])
def test_the_peak_does_not_depend_on_the_hint(lr0):
    ctl = AutoLRController()
    _drive(ctl, 600, _valley(0.1), lr0=lr0)
    assert 0.1 <= ctl.peak <= 0.5


def test_anneal_is_a_cosine_to_the_end_of_the_budget():
    ctl = AutoLRController(guard_rise=0.0, decay_frac=1.0)
    lrs = _drive(ctl, 400, _valley(0.1))
    end = ctl.search_end
    assert lrs[end] == pytest.approx(ctl.peak, rel=1e-6)
    mid = end + (400 - end) // 2
    assert lrs[mid] == pytest.approx(ctl.peak * 0.5, rel=0.02)
    assert lrs[-1] < 1e-3 * ctl.peak
    assert all(b <= a for a, b in zip(lrs[end:], lrs[end + 1:], strict=False))


def test_no_rise_keeps_the_largest_rate_reached():
    ctl = AutoLRController(search_frac=0.1, decades=1.0)
    _drive(ctl, 300, lambda lr, step: 1.0 - 0.001 * step)
    assert ctl.stop_lr == pytest.approx(ctl.peak)
    assert ctl.peak == pytest.approx(1e-4, rel=0.05)  # 1e-5 grown by one decade


def test_a_nonfinite_loss_ends_the_search():
    ctl = AutoLRController()
    _drive(ctl, 200, lambda lr, step: math.nan if lr > 1e-3 else 1.0)
    assert ctl.phase == "anneal" and ctl.peak < 1e-3


def test_guard_halves_the_peak_when_the_loss_rises_again():
    ctl = AutoLRController(guard_every=10)
    _drive(ctl, 600, lambda lr, step: (_valley(0.1)(lr, step) if step < 300 else 5.0))
    assert ctl.cuts >= 1


def test_logged_loss_means_are_used_without_a_step_loss():
    ctl = AutoLRController()
    ctl.reset({"lr": 1e-3, "momentum": 0.9}, 0, SPACE, 300)
    lr, losses = 1e-3, []
    for step in range(300):
        if step % 5 == 0:
            losses.append(_valley(0.1)(lr, step) + 1e-6 * step)
        lr = ctl.act(_state(step, 300, lr, losses)).get("lr", lr)
    assert ctl.phase == "anneal" and 0.05 < ctl.peak < 1.0


def test_state_round_trip_continues_identically():
    a, b = AutoLRController(), AutoLRController()
    loss = _valley(0.1)
    a.reset({"lr": 1e-3, "momentum": 0.9}, 0, SPACE, 300)
    b.reset({"lr": 1e-3, "momentum": 0.9}, 0, SPACE, 300)
    lr = 1e-3
    for step in range(300):
        if step == 90:
            b.load_state_dict(a.state_dict())
        a.observe_gradients(_ctx(step, loss(lr, step)))
        got = a.act(_state(step, 300, lr)).get("lr", lr)
        if step >= 90:
            b.observe_gradients(_ctx(step, loss(lr, step)))
            assert b.act(_state(step, 300, lr)).get("lr", lr) == got
        lr = got


def test_rollback_ends_the_search_and_halves():
    ctl = AutoLRController()
    ctl.reset({"lr": 1e-3, "momentum": 0.9}, 0, SPACE, 300)
    for step in range(10):
        ctl.observe_gradients(_ctx(step, 1.0))
        ctl.act(_state(step, 300, 1e-3))
    ctl.on_rollback({"lr": 0.5, "momentum": 0.9})
    assert ctl.phase == "anneal" and ctl.peak == pytest.approx(0.1)


def test_a_task_without_a_learning_rate_is_refused():
    space = HParamSpace([HParamSpec("momentum", 0.9, 0.0, 0.999)])
    with pytest.raises(ControllerError, match="learning rate"):
        AutoLRController().reset({"momentum": 0.9}, 0, space, 10)


@pytest.mark.slow
@pytest.mark.parametrize("lr0", [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
def test_digits_small_is_robust_to_the_initial_rate(lr0):
    """Digits (small preset, 300 steps, seed 0) from every initial rate: the issue's bar is 0.975 (measured worst case
    0.983, docs/results.md)."""
    pytest.importorskip("torch")
    from metacore.core.registry import load_registry
    from metacore.core.trainer import Trainer, TrainerConfig
    from metacore.testing import task_context

    task = load_registry(entry_points=False).task("digits").obj()
    ctx = task_context(task, "small", 0, None, {"lr": lr0})
    config = TrainerConfig(budget=300, log_interval=ctx.preset.log_interval, eval_interval=ctx.preset.eval_interval)
    result = Trainer(task, AutoLRController(), ctx, ctx.hparams, config).run()
    assert not result.diverged
    assert result.final["test/accuracy"] >= 0.975


def test_resume_mid_search_continues_exactly():
    """A checkpoint taken during the search (the kept copy included) resumes to the same weights and rates."""
    torch = pytest.importorskip("torch")
    import io

    from metacore.core.registry import load_registry
    from metacore.core.task import TaskContext
    from metacore.core.trainer import Trainer, TrainerConfig

    task = load_registry(entry_points=False).task("digits").obj()
    preset = task.preset("smoke")
    hparams = task.hparam_space().resolve({"lr": 1e-3})

    def trainer():
        ctx = TaskContext(preset, task.resolve_options(preset, {}), 0, "cpu", None, dict(hparams))
        ctl = AutoLRController(search_frac=0.5, decades=4.0, keep_every=2)
        return Trainer(task, ctl, ctx, hparams, TrainerConfig(budget=40, log_interval=5, eval_interval=20))

    torch.set_num_threads(1)
    whole = trainer()
    whole.run()
    part = trainer()
    part.advance(13)
    assert part.controller.phase == "search" and part._kept is not None
    buf = io.BytesIO()
    torch.save(part.checkpoint_payload(), buf)
    buf.seek(0)
    resumed = trainer()
    resumed.restore(torch.load(buf, weights_only=True))
    resumed.run()
    assert resumed.controller.state_dict() == whole.controller.state_dict()
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_the_peak_stays_well_below_the_stop_on_a_late_turn():
    """A loss that turns up late (flat near chance, as a BatchNorm network from a too-high rate) must not leave the
    peak at stop/backoff when the minimum came at a much smaller rate; without a window the kept rate caps it."""
    ctl = AutoLRController()

    def late(lr, step):  # falls until lr=0.05, then rises only slowly: 20 % above the minimum only near lr=10
        return 2.0 - 0.05 * math.log10(min(lr, 0.05) / 1e-6) + 0.1 * max(0.0, math.log10(lr / 0.05)) ** 2

    _drive(ctl, 600, late, lr0=1.0)
    assert ctl.stop_lr / 10 > ctl.kept_lr
    assert ctl.centered_lr <= ctl.peak < ctl.stop_lr / 10
    assert ctl.peak == pytest.approx(max(ctl.centered_lr, ctl.edge_lr / 4))
    only_kept = AutoLRController(window=0)
    _drive(only_kept, 600, late, lr0=1.0)
    assert only_kept.peak == pytest.approx(only_kept.kept_lr) and only_kept.edge_lr == 0.0


def _sharp(best):
    """Loss falls slowly with the rate up to ``best``, then rises ten times as steeply (a range test's shape)."""
    return lambda lr, step: 2.0 - 0.1 * math.log10(min(lr, best) / 1e-8) + 1.0 * max(0.0, math.log10(lr / best))


def test_the_centred_minimum_is_not_past_the_loss_minimum():
    """The stop comes several growth steps past the loss's minimum (the EMA lags); the centred average places the
    minimum at most ``window`` growth steps below the true one (a boxcar on an asymmetric valley leans to the gentle
    side), never above it, and it caps the peak."""
    ctl = AutoLRController(backoff=1.0)  # only the kept rate and the centred minimum cap the peak
    _drive(ctl, 600, _sharp(0.01), lr0=1e-6)
    g = ctl.growth
    assert ctl.stop_lr > 3 * 0.01
    assert 0.01 / g ** 6 <= ctl.centered_lr <= 0.01 * g
    assert ctl.peak == pytest.approx(ctl.centered_lr)
    without = AutoLRController(backoff=1.0, window=0)
    _drive(without, 600, _sharp(0.01), lr0=1e-6)
    assert without.peak == pytest.approx(without.kept_lr) and without.peak > ctl.peak


def test_the_peak_is_held_then_decayed_over_the_last_fraction():
    ctl = AutoLRController(guard_rise=0.0, decay_frac=0.3)
    budget = 1000
    lrs = _drive(ctl, budget, _valley(0.1))
    end = ctl.search_end
    start_decay = end + int(0.7 * (budget - end)) + 1
    assert all(lr == pytest.approx(ctl.peak) for lr in lrs[end:start_decay - 1])
    mid = start_decay + int(0.15 * (budget - end))
    assert lrs[mid] == pytest.approx(0.5 * ctl.peak, rel=0.05)
    assert lrs[-1] < 1e-2 * ctl.peak
    assert all(b <= a for a, b in zip(lrs[end:], lrs[end + 1:], strict=False))


def test_reaching_the_upper_bound_counts_as_a_rise():
    space = HParamSpace([HParamSpec("lr", 1e-3, 1e-8, 1.0, log=True), HParamSpec("momentum", 0.9, 0.0, 0.999)])
    ctl = AutoLRController()
    ctl.reset({"lr": 1e-4, "momentum": 0.9}, 0, space, 400)
    lr = 1e-4
    for step in range(400):
        ctl.observe_gradients(_ctx(step, 1.0 - 1e-3 * step))  # the loss never turns up
        lr = ctl.act(_state(step, 400, lr)).get("lr", lr)
    assert ctl.stop_lr == 1.0 and ctl.peak == pytest.approx(0.1)


def _flat_then_up(turn, noise_seed):
    """A loss flat near chance (with per-step noise) until the rate reaches ``turn``, then rising steeply: a BatchNorm
    ResNet's first 80 steps, where the centred minimum is placed by the noise."""
    import random

    rng = random.Random(noise_seed)
    return lambda lr, step: 2.3 + rng.gauss(0.0, 0.05) + 2.0 * max(0.0, math.log10(lr / turn))


def test_on_a_flat_curve_the_edge_holds_the_peak_up():
    peaks, centred, without = [], [], []
    for noise_seed in range(8):
        ctl = AutoLRController()
        _drive(ctl, 600, _flat_then_up(0.1, noise_seed), lr0=1e-4)
        g = ctl.growth
        # the first rate 10 % up: within a window of the turn (the centred average sees 5 steps ahead)
        assert 0.1 / g ** 5 <= ctl.edge_lr <= 0.1 * g ** 5
        assert ctl.peak == pytest.approx(min(ctl.stop_lr / 10, max(ctl.centered_lr, ctl.edge_lr / 4)))
        peaks.append(ctl.peak)
        centred.append(ctl.centered_lr)
        off = AutoLRController(edge_rise=0.0, flat_z=0.0)  # the edge alone: no flat-curve reading either
        _drive(off, 600, _flat_then_up(0.1, noise_seed), lr0=1e-4)
        assert off.edge_lr == 0.0 and off.peak <= off.centered_lr
        without.append(off.peak)
    assert max(peaks) / min(peaks) < 3  # the peak stays within a factor of the turn ...
    assert all(0.1 / 4 / 2 <= p <= 0.1 for p in peaks)
    assert max(centred) / min(centred) > 10  # ... while the minimum alone wanders over a decade or more
    assert min(without) < min(peaks) / 3


def _plateau_then_jumps(end, noise_seed, level=0.693, noise=0.002):
    """A loss at chance with small batch noise until the rate reaches ``end``, then jumping 8 % up every other step,
    so that no centred average rises 10 % (no edge): an AdamW transformer's 19-step search (imdb)."""
    import random

    rng = random.Random(noise_seed)
    up = [0.0]

    def loss(lr, step):
        if lr < end:
            return level + rng.gauss(0.0, noise)
        up[0] = 1.0 - up[0]
        return level * (1 + 0.08 * up[0]) + rng.gauss(0.0, noise)
    return loss


def test_a_flat_curve_without_an_edge_takes_a_decade_below_where_the_plateau_ends():
    """No edge and a minimum within the noise: the minimum is noise (it wanders over decades with the noise seed),
    so the peak is the rate where the loss first leaves its plateau, over ``flat_backoff``; ``flat_z=0`` restores
    the centred minimum."""
    space = HParamSpace([HParamSpec("lr", 2e-5, 1e-8, 1e-2, log=True)])
    peaks, centred = [], []
    for noise_seed in range(8):
        ctl = AutoLRController()
        ctl.reset({"lr": 2e-5}, 0, space, 200)
        lr, loss = 2e-5, _plateau_then_jumps(1e-3, noise_seed)
        for step in range(200):
            ctl.observe_gradients(_ctx(step, loss(lr, step)))
            lr = ctl.act(_state(step, 200, lr)).get("lr", lr)
        assert ctl.edge_lr == 0.0 and ctl.stop_lr == 1e-2  # no edge: the search ran to the task's bound
        assert ctl.fall_deviations() < 3
        assert 1e-3 / 10 <= ctl.flat_lr <= 1e-3 * ctl.growth / 10
        assert ctl.peak == pytest.approx(ctl.flat_lr)
        assert ctl.diagnostics()["autolr_flat_lr"] == ctl.flat_lr
        peaks.append(ctl.peak)
        centred.append(ctl.centered_lr)
        off = AutoLRController(flat_z=0.0)
        off.reset({"lr": 2e-5}, 0, space, 200)
        lr, loss = 2e-5, _plateau_then_jumps(1e-3, noise_seed)
        for step in range(200):
            off.observe_gradients(_ctx(step, loss(lr, step)))
            lr = off.act(_state(step, 200, lr)).get("lr", lr)
        assert off.flat_lr == 0.0 and off.peak == pytest.approx(off.centered_lr)
    assert max(peaks) / min(peaks) < 2
    assert max(centred) / min(centred) > 10


def test_a_curve_that_never_leaves_its_plateau_keeps_the_hint():
    space = HParamSpace([HParamSpec("lr", 2e-5, 1e-8, 1e-2, log=True)])
    ctl = AutoLRController()
    ctl.reset({"lr": 3e-5}, 0, space, 200)
    lr, loss = 3e-5, _plateau_then_jumps(1.0, 0)  # the plateau outlasts the search
    for step in range(200):
        ctl.observe_gradients(_ctx(step, loss(lr, step)))
        lr = ctl.act(_state(step, 200, lr)).get("lr", lr)
    assert ctl.flat_lr == 3e-5 and ctl.peak == pytest.approx(3e-5)


def test_a_falling_curve_without_an_edge_is_not_flat():
    """A loss that falls by more than its noise (electricity's Adam searches: no edge, a fall of 5-11 noise
    deviations) keeps its centred minimum."""
    import random

    rng = random.Random(0)
    space = HParamSpace([HParamSpec("lr", 1e-3, 1e-8, 1.0, log=True)])
    ctl = AutoLRController()
    ctl.reset({"lr": 1e-3}, 0, space, 300)
    lr = 1e-3
    for step in range(300):
        loss = 1.0 - 0.05 * math.log10(max(lr, 1e-5) / 1e-5) + rng.gauss(0.0, 0.01)
        ctl.observe_gradients(_ctx(step, loss))
        lr = ctl.act(_state(step, 300, lr)).get("lr", lr)
    assert ctl.edge_lr == 0.0 and ctl.flat_lr == 0.0 and ctl.fall_deviations() > 3
    assert ctl.peak == pytest.approx(min(ctl.stop_lr / 10, ctl.centered_lr))
