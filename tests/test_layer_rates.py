"""Per-tensor rates: the driver scales each update by its rate (``TensorRates``), and ``autolr``'s layer rates find
the scale-invariant weights of plain SGD and give them ``lr × ||w0||² / median``. The premise is checked numerically:
behind a BatchNorm a weight's loss does not change with its scale, so its gradient is orthogonal to it and shrinks as
``1 / scale`` (a turning rate of ``lr / ||w||²``)."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from metacore.controllers.autolr import AutoLRController
from metacore.core.controller import Controller, StepContext
from metacore.core.driver import ControllerDriver
from metacore.core.errors import ControllerError
from metacore.core.hparams import HParamSpace, HParamSpec

SPACE = HParamSpace([HParamSpec("lr", 0.1, 1e-8, 10.0, log=True), HParamSpec("momentum", 0.0, 0.0, 0.999)])


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _loss(model: nn.Module) -> torch.Tensor:
    x, y = _batch()
    return nn.functional.cross_entropy(model(x), y)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    model.zero_grad()
    _loss(model).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def test_a_weight_behind_batchnorm_is_scale_invariant_by_finite_differences():
    model = _bn_net()
    conv, fc = model[3].weight, model[8].weight
    base = _loss(model).item()
    grads = _grads(model)
    g_conv = grads[3]
    with torch.no_grad():
        conv.mul_(3.0)
    assert _loss(model).item() == pytest.approx(base, rel=1e-5)  # the loss does not see the conv's scale
    assert torch.allclose(_grads(model)[3], g_conv / 3.0, rtol=1e-2, atol=1e-6)  # its gradient shrinks as 1/scale
    with torch.no_grad():
        conv.div_(3.0)
        fc.mul_(3.0)
    assert abs(_loss(model).item() - base) > 1e-3  # the head is not scale-invariant
    with torch.no_grad():
        fc.div_(3.0)
    # the derivative along the weight itself (finite difference of L((1 + e) w)) is 0 for the conv, not for the head
    for weight, zero in ((conv, True), (fc, False)):
        eps = 1e-3
        with torch.no_grad():
            weight.mul_(1 + eps)
        up = _loss(model).item()
        with torch.no_grad():
            weight.div_(1 + eps)
        fd = (up - base) / eps
        assert (abs(fd) < 1e-4) == zero, (weight.shape, fd)


class _Rates(Controller):
    name = "rates"

    def __init__(self, rates):
        super().__init__()
        self.rates, self.seen = rates, []

    def observe_gradients(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        self.seen.append([p.detach().clone() for p in ctx.params])

    def tensor_rates(self, ctx: StepContext):
        return self.rates


def _one_step(controller, momentum=0.0):
    model = _bn_net()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=momentum)
    driver = ControllerDriver(controller, SPACE, params=params, optimizer=opt)
    driver.start({"lr": 0.1, "momentum": momentum}, 0, 10)
    before = [p.detach().clone() for p in params]
    _loss(model).backward()
    driver.before_optimizer_step(0, budget=10)
    opt.step()
    driver.after_optimizer_step()
    return before, params


def test_the_driver_scales_each_update_by_its_rate_and_after_step_sees_it():
    n = len(list(_bn_net().parameters()))
    rates = [2.0 if i == 3 else 0.5 if i == 6 else 1.0 for i in range(n)]
    ctl = _Rates(rates)
    before, params = _one_step(ctl)
    _, plain = _one_step(_Rates(None))
    for i, (b, p, q) in enumerate(zip(before, params, plain, strict=True)):
        assert torch.allclose(p - b, rates[i] * (q - b), rtol=1e-5, atol=1e-8), i
    assert all(torch.equal(s, p) for s, p in zip(ctl.seen[0], params, strict=True))


@pytest.mark.parametrize("rates, message", [([1.0], "rates for"), (None, "finite")])
def test_bad_rates_are_the_controllers_fault(rates, message):
    n = len(list(_bn_net().parameters()))
    with pytest.raises(ControllerError, match=message):
        _one_step(_Rates(rates if rates is not None else [float("nan")] * n))


def _autolr_rates(optimizer_cls=torch.optim.SGD, **options):
    model = _bn_net()
    params = list(model.parameters())
    ctl = AutoLRController(**options)
    ctl.reset({"lr": 0.1, "momentum": 0.0}, 0, SPACE, 100)
    grads = _grads(model)
    ctx = StepContext(step=0, params=params, grads=grads, optimizer=optimizer_cls(params, lr=0.1), hparams={},
                      val_loss_and_grads=None)
    return ctl, params, ctl.tensor_rates(ctx)


def test_autolr_gives_the_scale_invariant_weights_of_sgd_their_norm_over_the_median():
    ctl, params, rates = _autolr_rates()
    invariant = [p.ndim == 4 for p in params]  # the two conv kernels (4-d); BN and the head are not invariant
    squares = {i: float(p.norm()) ** 2 for i, p in enumerate(params) if invariant[i]}
    median = statistics.median(squares.values())
    assert len(squares) == 2
    assert rates == pytest.approx([squares[i] / median if i in squares else 1.0 for i in range(len(params))])
    assert ctl.diagnostics()["autolr_layer_tensors"] == 2.0
    # fixed for the run, and carried by the state
    clone = AutoLRController()
    clone.reset({"lr": 0.1, "momentum": 0.0}, 0, SPACE, 100)
    clone.load_state_dict(ctl.state_dict())
    assert clone.rates == rates
    _, _, squared = _autolr_rates(layer_power=2.0)
    assert squared == pytest.approx([r * r for r in rates])
    _, _, vectors = _autolr_rates(vector_factor=3.0)  # BatchNorm's scales and shifts, the head's bias
    assert vectors == pytest.approx([3.0 if p.ndim == 1 else r for p, r in zip(params, rates, strict=True)])


@pytest.mark.parametrize("optimizer_cls, options", [(torch.optim.Adam, {}), (torch.optim.SGD, {"layer_rates": False}),
                                                    (torch.optim.SGD, {"layer_tol": 0.0})])
def test_autolr_leaves_adaptive_optimizers_and_switched_off_runs_alone(optimizer_cls, options):
    ctl, _, rates = _autolr_rates(optimizer_cls, **options)
    assert rates is None
    assert ctl.rates == []


def test_a_residual_policy_passes_its_teachers_layer_rates_on(data_dir):
    """``ppo`` over ``autolr`` (the shipped policy) on cifar10: the driver gets the teacher's layer rates."""
    from metacore.core.registry import load_registry
    from metacore.testing import run_controller

    registry = load_registry(entry_points=False)
    ctl = registry.controller("ppo").obj()
    trainer, _ = run_controller(ctl, registry.task("cifar10").obj(), steps=3, data_dir=data_dir)
    assert trainer.driver.rater
    assert ctl.diagnostics()["teacher_autolr_layer_tensors"] == 20.0  # every convolution of the ResNet-18


def test_autolr_rates_resume_as_saved_and_an_older_checkpoint_keeps_running_without_them():
    fresh = AutoLRController()
    fresh.reset({"lr": 0.1, "momentum": 0.0}, 0, SPACE, 100)
    state = fresh.state_dict()
    assert state["rates"] is None  # not decided before the first step
    ctl, params, rates = _autolr_rates()
    clone = AutoLRController()
    clone.reset({"lr": 0.1, "momentum": 0.0}, 0, SPACE, 100)
    clone.load_state_dict(state)
    assert clone.rates is None
    older = {k: v for k, v in ctl.state_dict().items() if k != "rates"}  # saved by a version without layer rates
    clone.load_state_dict(older)
    grads = _grads(_bn_net())
    ctx = StepContext(step=5, params=params, grads=grads, optimizer=torch.optim.SGD(params, lr=0.1), hparams={},
                      val_loss_and_grads=None)
    assert clone.tensor_rates(ctx) is None and rates is not None
