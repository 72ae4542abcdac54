"""The GPU fast path's switches, checked where they can be on a CPU: torch.compile is used for training when asked,
channels_last gives the same network, fused SGD takes the hypergradient rate as a tensor, bad precision is refused."""

import pytest

from metacore.app.runner import RunRequest, plan_run
from metacore.core.errors import UsageError
from metacore.core.registry import load_registry
from metacore.core.task import TaskContext
from metacore.core.trainer import Trainer, TrainerConfig

torch = pytest.importorskip("torch")


def _trainer(controller_name="static", steps=6, controller=None, **cfg):
    registry = load_registry(entry_points=False)
    task = registry.task("digits").obj()
    preset = task.preset("smoke")
    hparams = task.hparam_space().defaults()
    ctx = TaskContext(preset, task.resolve_options(preset, {}), 0, "cpu", None, dict(hparams))
    config = TrainerConfig(budget=steps, log_interval=3, eval_interval=100, **cfg)
    return Trainer(task, controller or registry.controller(controller_name).obj(), ctx, hparams, config)


def test_compile_trains_through_the_compiled_model_and_keeps_plain_state_dicts(monkeypatch):
    calls = []

    class Wrapped(torch.nn.Module):  # stands in for the OptimizedModule torch.compile returns
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, *args):
            calls.append(len(args))
            return self._orig_mod(*args)

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Wrapped(model))
    trainer = _trainer(compile=True)
    trainer.run()
    assert len(calls) == 6  # every training step went through the compiled module
    assert not any(k.startswith("_orig_mod") for k in trainer.model.state_dict())
    assert not _trainer(compile=False)._train_model.__class__.__name__ == "Wrapped"


def test_no_autocast_on_cpu_or_with_fp32():
    assert _trainer()._bf16 is False
    assert _trainer(precision="fp32")._bf16 is False


def test_bad_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="--precision"):
        plan_run(RunRequest(task="digits", controller="static", preset="smoke", precision="fp8"))


def test_channels_last_resnet_computes_the_same_function():
    from metacore.plugins.cifar10 import cifar_resnet18

    torch.manual_seed(0)
    plain = cifar_resnet18(4).eval()
    nhwc = cifar_resnet18(4, channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert nhwc[1].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-4, atol=1e-4)


def test_fused_sgd_takes_the_hypergradient_rate_as_a_tensor():
    from metacore.controllers.hypergrad import HypergradController
    from metacore.controllers.hypergrad_optimizers import takes_tensor_lr as _takes_tensor_lr

    p = torch.nn.Parameter(torch.zeros(2))
    assert _takes_tensor_lr(torch.optim.SGD([p], lr=0.1, fused=True))
    assert not _takes_tensor_lr(torch.optim.SGD([p], lr=0.1))
    # the same run with the rate handed over as a tensor and as a float ends at the same rate and weights
    results = []
    for mode in ("on", "off"):
        trainer = _trainer("hypergrad", steps=8, controller=HypergradController(tensor_lr=mode))
        trainer.run()
        results.append((float(trainer.hparams["lr"]), [t.detach().clone() for t in trainer.model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)
