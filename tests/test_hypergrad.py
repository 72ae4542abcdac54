"""Hypergradient controller: derivatives against finite differences, guards, state round-trip, rollback, CLI."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest

torch = pytest.importorskip("torch")

from metacore.controllers import hypergrad_math as hm  # noqa: E402
from metacore.controllers.hypergrad import HypergradController  # noqa: E402
from metacore.core.controller import StepContext  # noqa: E402
from metacore.core.errors import UsageError  # noqa: E402
from metacore.core.hparams import HParamSpace, HParamSpec  # noqa: E402

SGD_SPACE = HParamSpace([
    HParamSpec("lr", 0.1, 1e-8, 10.0, log=True),
    HParamSpec("momentum", 0.9, 0.0, 0.999),
    HParamSpec("weight_decay", 0.0, 0.0, 1.0),
])
ADAM_SPACE = HParamSpace([
    HParamSpec("lr", 1e-2, 1e-8, 10.0, log=True),
    HParamSpec("beta1", 0.9, 0.0, 0.999, group_key="betas", index=0),
    HParamSpec("weight_decay", 0.0, 0.0, 1.0),
])


# ---------------------------------------------------------------------------------------------------- helpers
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _batches(n=6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(n)]


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _grad(model, batch):
    model.zero_grad(set_to_none=True)
    _loss(model, batch).backward()


def _ctx(model, opt, step=0):
    params = [p for p in model.parameters() if p.grad is not None]
    return StepContext(step=step, params=params, grads=[p.grad for p in params], optimizer=opt, hparams={},
                       val_loss_and_grads=lambda: (_ for _ in ()).throw(AssertionError("no val here")))


def _set(opt, role, value):
    for g in opt.param_groups:
        if role == "beta1":
            g["betas"] = (value, g["betas"][1])
        else:
            g[role] = value


def _get(opt, role):
    g = opt.param_groups[0]
    return g["betas"][0] if role == "beta1" else g[role]


def _setup(make_opt, warm):
    model = _model()
    opt = make_opt(model.parameters())
    batches = _batches(warm + 2)
    for b in batches[:warm]:  # non-trivial optimizer state (momentum buffers, Adam moments)
        _grad(model, b)
        opt.step()
    return model, opt, batches[warm], batches[warm + 1]


def _hypergrad(make_opt, space, hparams, warm, adapt="all"):
    """The controller's derivatives at step t (with respect to step s's hyperparameters)."""
    model, opt, b_s, b_t = _setup(make_opt, warm)
    ctrl = HypergradController(adapt=adapt)
    ctrl.reset(hparams, 0, space, 100)
    _grad(model, b_s)
    ctrl.observe_gradients(_ctx(model, opt, 0))
    ctrl.act(None)  # discard: step s runs with the hyperparameters the optimizer has
    opt.step()
    _grad(model, b_t)
    ctrl.observe_gradients(_ctx(model, opt, 1))
    return {k[len("hypergradient_"):]: float(v) for k, v in ctrl.diagnostics().items()
            if k.startswith("hypergradient_")}, model, opt


def _finite_difference(make_opt, role, warm, rel=1e-5):
    """d loss(b_t, θ_t) / d η_s by central differences: redo step s from a copy with η ± δ."""
    model, opt, b_s, b_t = _setup(make_opt, warm)
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    eta = _get(opt, role)
    delta = rel * max(abs(eta), 1e-2)

    def f(value):
        model.load_state_dict(model_state)
        opt.load_state_dict(copy.deepcopy(opt_state))
        _set(opt, role, value)
        _grad(model, b_s)
        opt.step()
        with torch.no_grad():
            return float(_loss(model, b_t))

    return (f(eta + delta) - f(eta - delta)) / (2 * delta)


CASES = [
    # (id, optimizer factory, space, hparams, roles checked, warm-up steps)
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1), SGD_SPACE, {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
     {"lr": "lr"}, 2),
    ("sgd-momentum-wd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01), SGD_SPACE,
     {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}, {"lr": "lr", "momentum": "momentum",
                                                          "weight_decay": "weight_decay"}, 3),
    ("sgd-momentum-first-step", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
     SGD_SPACE, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
     {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay"}, 0),
    ("sgd-nesterov-dampening", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3,
                                                         weight_decay=0.02), SGD_SPACE,
     {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.02}, {"lr": "lr", "momentum": "momentum",
                                                          "weight_decay": "weight_decay"}, 2),
    ("adam-l2", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05), ADAM_SPACE,
     {"lr": 1e-2, "beta1": 0.9, "weight_decay": 0.05}, {"lr": "lr", "momentum": "beta1",
                                                       "weight_decay": "weight_decay"}, 3),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), ADAM_SPACE,
     {"lr": 1e-2, "beta1": 0.9, "weight_decay": 0.1}, {"lr": "lr", "momentum": "beta1",
                                                      "weight_decay": "weight_decay"}, 3),
]


# ---------------------------------------------------------------------------------------------------- derivatives
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hypergradients_match_finite_differences(case):
    name, make_opt, space, hparams, roles, warm = case
    if name == "sgd-nesterov-dampening":
        roles = {"lr": "lr", "weight_decay": "weight_decay"}  # momentum adaptation refuses Nesterov
        adapt = "lr,weight_decay"
    else:
        adapt = "all"
    got, _, _ = _hypergrad(make_opt, space, hparams, warm, adapt=adapt)
    for role, hp in roles.items():
        fd = _finite_difference(make_opt, hp, warm)
        assert role in got, f"{name}: no hypergradient for {role}"
        assert got[role] == pytest.approx(fd, rel=1e-4, abs=1e-9), f"{name} {role}: {got[role]} vs FD {fd}"
    assert any(abs(v) > 1e-6 for v in got.values())  # the check is not vacuous


def test_lr_hypergradient_matches_closed_form_sgd_and_adam():
    # plain SGD: ∂f(θ_t)/∂α = -∇f(θ_t)·∇f(θ_s)
    model, opt, b_s, b_t = _setup(lambda p: torch.optim.SGD(p, lr=0.1), 1)
    _grad(model, b_s)
    g_s = [p.grad.clone() for p in model.parameters()]
    ctrl = HypergradController()
    ctrl.reset({"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}, 0, SGD_SPACE, 10)
    ctrl.observe_gradients(_ctx(model, opt))
    ctrl.act(None)
    opt.step()
    _grad(model, b_t)
    ctrl.observe_gradients(_ctx(model, opt))
    expected = -sum(float((p.grad * g).sum()) for p, g in zip(model.parameters(), g_s, strict=True))
    assert float(ctrl.diagnostics()["hypergradient_lr"]) == pytest.approx(expected, rel=1e-6)

    # Adam: ∂f(θ_t)/∂α = -∇f(θ_t)·m̂_s/(√v̂_s + ε), from the optimizer's moments after step s
    model, opt, b_s, b_t = _setup(lambda p: torch.optim.Adam(p, lr=1e-2), 2)
    ctrl = HypergradController()
    ctrl.reset({"lr": 1e-2, "beta1": 0.9, "weight_decay": 0.0}, 0, ADAM_SPACE, 10)
    _grad(model, b_s)
    ctrl.observe_gradients(_ctx(model, opt))
    ctrl.act(None)
    opt.step()
    _grad(model, b_t)
    expected = 0.0
    for p in model.parameters():
        st = opt.state[p]
        k = float(st["step"])
        direction = (st["exp_avg"] / (1 - 0.9**k)) / ((st["exp_avg_sq"] / (1 - 0.999**k)).sqrt() + 1e-8)
        expected -= float((p.grad * direction).sum())
    ctrl.observe_gradients(_ctx(model, opt))
    assert float(ctrl.diagnostics()["hypergradient_lr"]) == pytest.approx(expected, rel=1e-6)


def test_val_signal_replaces_the_training_gradient_every_k_steps():
    model, opt, b_s, b_t = _setup(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5), 1)
    ctrl = HypergradController(signal="val", val_every=2, adapt="all")
    ctrl.reset({"lr": 0.1, "momentum": 0.5, "weight_decay": 0.0}, 0, SGD_SPACE, 10)
    val_batch = _batches(9)[-1]
    seen = []

    def val_loss_and_grads(params):
        loss = _loss(model, val_batch)
        grads = list(torch.autograd.grad(loss, params))
        seen.append([g.clone() for g in grads])
        return loss.detach(), grads

    hgrads = []
    prev: list = []
    for step, batch in enumerate([b_s, b_t, b_s]):
        _grad(model, batch)
        train_grads = [p.grad.clone() for p in model.parameters()]
        ctx = _ctx(model, opt, step)
        ctx.val_loss_and_grads = lambda ctx=ctx: val_loss_and_grads(ctx.params)
        before = [p.detach().clone() for p in model.parameters()]
        ctrl.observe_gradients(ctx)
        if step:  # -g·(θ_s - θ_t)/α with the gradient the controller should have used
            grads = seen[-1] if step == 1 else train_grads
            pairs = zip(grads, prev, before, strict=True)
            expected = -sum(float((g * (a - b)).sum()) for g, a, b in pairs) / 0.1
            hgrads.append((float(ctrl.diagnostics()["hypergradient_lr"]), expected))
        prev = before
        for name, value in ctrl.act(None).items():
            if name != "lr":
                _set(opt, name, value)
        opt.step()
    assert len(seen) == 1  # only the second observed step (count 2 of val_every=2) asked for a validation batch
    for got, expected in hgrads:
        assert got == pytest.approx(expected, rel=1e-6) and expected != 0.0
    assert float(ctrl.diagnostics()["val_signals"]) == 1


# ---------------------------------------------------------------------------------------------------- guards
def test_update_rules_keep_bounds_and_ignore_non_finite():
    v = torch.tensor(0.1, dtype=torch.float64)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    new, finite = hm.update(v, nan, nan, rule="multiplicative", beta=0.5, kind="log", low=1e-6, high=1.0,
                            max_log_step=0.5)
    assert float(new) == 0.1 and not bool(finite)
    big = torch.tensor(1e30, dtype=torch.float64)
    for rule in ("additive", "multiplicative"):
        new, finite = hm.update(v, big, torch.tensor(1.0, dtype=torch.float64), rule=rule, beta=1.0, kind="log",
                                low=1e-6, high=1.0, max_log_step=0.5)
        assert bool(finite) and 0.1 * math.exp(-0.5) - 1e-12 <= float(new) < 0.1 and float(new) > 0
        new, _ = hm.update(v, -big, torch.tensor(-1.0, dtype=torch.float64), rule=rule, beta=1.0, kind="log",
                           low=1e-6, high=0.12, max_log_step=0.5)
        assert float(new) == pytest.approx(0.12)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    new, finite = hm.update(v, inf, inf, rule="additive", beta=1.0, kind="log", low=1e-6, high=1.0,
                            max_log_step=0.5)
    assert float(new) == 0.1 and not bool(finite)
    # momentum (logit) and weight decay (log(λ + λ0)) stay inside [low, high] and can reach 0
    m, _ = hm.update(torch.tensor(0.9, dtype=torch.float64), big, torch.tensor(-1.0, dtype=torch.float64),
                     rule="additive", beta=1.0, kind="logit", low=0.0, high=0.95, max_log_step=10.0)
    assert 0.0 <= float(m) <= 0.95
    w, _ = hm.update(torch.tensor(1e-4, dtype=torch.float64), big, torch.tensor(1.0, dtype=torch.float64),
                     rule="additive", beta=1.0, kind="logshift", low=0.0, high=0.1, max_log_step=10.0)
    assert float(w) == 0.0


def test_controller_never_proposes_non_finite_or_out_of_bounds_lr():
    model, opt, b_s, b_t = _setup(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1)
    ctrl = HypergradController(adapt="all", hyper_lr=5.0, max_step=3.0)
    ctrl.reset({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}, 0, SGD_SPACE, 10)
    proposals = []
    for step in range(8):
        _grad(model, _batches(8)[step])
        if step in (3, 4):  # poisoned gradients
            for p in model.parameters():
                p.grad.fill_(float("nan") if step == 3 else float("inf"))
        ctrl.observe_gradients(_ctx(model, opt, step))
        changes = ctrl.act(None)
        proposals.append(changes)
        for name, value in changes.items():
            spec = SGD_SPACE[name]
            assert math.isfinite(value) and spec.low <= value <= spec.high, (step, name, value)
        _set(opt, "lr", changes.get("lr", opt.param_groups[0]["lr"]))
        if step not in (3, 4):
            opt.step()
    assert float(ctrl.diagnostics()["nonfinite"]) >= 2
    assert all(c.get("lr", 0.1) > 0 for c in proposals)


def test_tensor_lr_follows_the_float_trajectory():
    lrs = {}
    for mode in ("off", "on"):
        model, opt, _, _ = _setup(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 0)
        ctrl = HypergradController(tensor_lr=mode)
        ctrl.reset({"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}, 0, SGD_SPACE, 10)
        trace = []
        for step, batch in enumerate(_batches(6)):
            _grad(model, batch)
            ctrl.observe_gradients(_ctx(model, opt, step))
            for name, value in ctrl.act(None).items():
                assert isinstance(value, torch.Tensor) == (mode == "on")
                _set(opt, name, value)
            opt.step()
            trace.append(float(opt.param_groups[0]["lr"]))
        lrs[mode] = trace
    assert lrs["on"] == pytest.approx(lrs["off"], rel=1e-5)
    assert len(set(lrs["off"])) > 2


def test_options_are_validated():
    with pytest.raises(UsageError, match="adapt"):
        HypergradController(adapt="lr,dropout")
    with pytest.raises(UsageError, match="signal"):
        HypergradController(signal="sometimes")
    with pytest.raises(UsageError, match="rule"):
        HypergradController(rule="fancy")


# ---------------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("make_opt,space,hparams", [
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01), SGD_SPACE,
     {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    (lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01), ADAM_SPACE,
     {"lr": 1e-2, "beta1": 0.9, "weight_decay": 0.01}),
], ids=["sgd", "adam"])
def test_state_dict_round_trip_reproduces_next_action(make_opt, space, hparams):
    batches = _batches(6)
    model = _model()
    opt = make_opt(model.parameters())
    ctrl = HypergradController(adapt="all")
    ctrl.reset(hparams, 0, space, 100)

    def step(ctrl, model, opt, batch):
        _grad(model, batch)
        ctrl.observe_gradients(_ctx(model, opt))
        changes = ctrl.act(None)
        for name, value in changes.items():
            _set(opt, name, value)
        opt.step()
        return changes

    for b in batches[:4]:
        step(ctrl, model, opt, b)
    # checkpoint through the weights-only path the trainer uses
    buf = io.BytesIO()
    torch.save({"ctrl": ctrl.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    expected = step(ctrl, model, opt, batches[4])

    model2 = _model()
    model2.load_state_dict(saved["model"])
    opt2 = make_opt(model2.parameters())
    opt2.load_state_dict(saved["opt"])
    ctrl2 = HypergradController(adapt="all")
    ctrl2.reset(hparams, 0, space, 100)
    ctrl2.load_state_dict(saved["ctrl"])  # before the first observed step: bound lazily
    got = step(ctrl2, model2, opt2, batches[4])
    assert expected and got == expected


# ---------------------------------------------------------------------------------------------------- trainer
def _digits_trainer(controller, steps, hparams=None, memory_tracker=None):
    from metacore.core.task import TaskContext
    from metacore.core.trainer import Trainer, TrainerConfig
    from metacore.plugins.digits import DigitsTask

    task = DigitsTask()
    preset = task.preset("smoke")
    hp = task.hparam_space().resolve(hparams or {})
    ctx = TaskContext(preset, task.resolve_options(preset, {}), 0, "cpu", None, dict(hp))
    run_id = memory_tracker.start_run("t", "r") if memory_tracker is not None else None
    return Trainer(task, controller, ctx, hp, TrainerConfig(budget=steps, log_interval=5, eval_interval=1000),
                   tracker=memory_tracker, run_id=run_id)


def test_rollback_reaches_the_controller():
    ctrl = HypergradController()
    trainer = _digits_trainer(ctrl, 30, {"lr": 0.01})
    trainer.advance(7)  # a snapshot at step 5
    lr_snapshot = trainer.guard.snapshot.hparams["lr"]
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))  # the next logged loss is NaN: rollback
    trainer.advance(3)
    assert trainer.rollbacks == 1 and not trainer.diverged
    assert float(ctrl.diagnostics()["rollbacks_seen"]) == 1
    # the controller took the trainer's halved rate and skips one hypergradient, then goes on adapting
    assert float(ctrl.values["lr"]) == pytest.approx(float(lr_snapshot) * 0.5)
    assert float(trainer.hparams["lr"]) == pytest.approx(float(lr_snapshot) * 0.5)
    result = trainer.run()
    assert not result.diverged and math.isfinite(result.hparams_final["lr"]) and result.hparams_final["lr"] > 0
    assert result.hparams_final["lr"] != pytest.approx(float(lr_snapshot) * 0.5)


def test_trainer_logs_diagnostics_and_moves_lr(memory_tracker):
    for options in ({}, {"signal": "val", "val_every": 2}):
        ctrl = HypergradController(**options)
        trainer = _digits_trainer(ctrl, 20, {"lr": 1e-3}, memory_tracker)
        result = trainer.run()
        assert result.hparams_final["lr"] != pytest.approx(1e-3)
        cos = memory_tracker.history(trainer.run_id, "controller/cos_lr")
        assert cos and memory_tracker.history(trainer.run_id, "controller/hypergradient_lr")
        assert all(math.isfinite(v) and -1 <= v <= 1 for _, v in cos)
        assert len({v for _, v in memory_tracker.history(trainer.run_id, "hparam/lr")}) > 1


def test_cli_hypergrad_smoke(cli):
    proc = cli("run", "--task", "digits", "--controller", "hypergrad", "--preset", "smoke", "--set", "lr=0.001",
               "--controller-set", "adapt=all", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    runs = {r["role"]: r for r in summary["runs"]}
    assert runs["controller"]["controller"] == "hypergrad" and runs["baseline"]["controller"] == "static"
    assert runs["controller"]["hparams_final"]["lr"] != pytest.approx(1e-3)
    assert runs["baseline"]["hparams_final"]["lr"] == pytest.approx(1e-3)
    bad = cli("run", "--task", "digits", "--controller", "hypergrad", "--preset", "smoke",
              "--controller-set", "signal=sometimes")
    assert bad.returncode == 2 and "signal" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("adapt", ["weight_decay", "momentum"])
def test_adapting_one_role_without_lr_runs_and_leaves_lr_alone(adapt):
    ctrl = HypergradController(adapt=adapt)  # the trust bound (on by default) acts on lr only when lr is adapted
    trainer = _digits_trainer(ctrl, 12, {"lr": 0.01, "weight_decay": 1e-3})
    result = trainer.run()
    assert result.hparams_final["lr"] == pytest.approx(0.01)
    name = {"weight_decay": "weight_decay", "momentum": "momentum"}[adapt]
    start = {"weight_decay": 1e-3, "momentum": trainer.space[name].default}[adapt]
    assert result.hparams_final[name] != pytest.approx(start)


def test_state_dict_holds_the_weights_copy_alone_and_survives_an_unbound_round_trip():
    ctrl = HypergradController()
    trainer = _digits_trainer(ctrl, 8, {"lr": 0.01})
    trainer.advance(4)
    state = ctrl.state_dict()
    n = sum(p.numel() for p in trainer.params)
    # the θ copy does not share storage with the flat gradient: a checkpoint holds n numbers for it, not 2n
    assert state["prev"][0].untyped_storage().nbytes() == n * state["prev"][0].element_size()
    fresh = HypergradController()
    fresh.reset(dict(trainer.hparams), 0, trainer.space, 8)
    fresh.load_state_dict(state)  # not bound yet: a snapshot taken now must carry the loaded buffers on
    again = fresh.state_dict()
    assert len(again["prev"]) == len(state["prev"])
    for a, b in zip(again["prev"], state["prev"], strict=True):
        assert torch.equal(a, b)
