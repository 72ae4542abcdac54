"""MetacoreCallback in a real ``lightning.pytorch.Trainer``: scikit-learn's digits, CPU, one thread, offline."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from conftest import REPO  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from metacore import Controller, OptionSpec  # noqa: E402
from metacore.core.errors import ControllerError, UsageError  # noqa: E402
from metacore.integrations.lightning import MetacoreCallback  # noqa: E402

LR0 = 0.05


def _example():
    """examples/lightning_digits.py (the docs' example), imported from its file: its data module is used here too."""
    spec = importlib.util.spec_from_file_location("lightning_digits_example", REPO / "examples" / "lightning_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example()


class Net(L.LightningModule):
    """A small MLP; plain SGD (no momentum, no decay), so the rate a step used is -(Δθ·g)/(g·g) exactly."""

    def __init__(self, scheduler: str | None = None, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.scheduler = scheduler
        self.automatic_optimization = not manual
        self.val_logged: list[float] = []
        self.train_logged: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        self.train_logged.append(float(loss))
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_logged.append(float(self.trainer.callback_metrics["val_loss"]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR0)
        if self.scheduler == "step":  # x0.7 after every optimizer step
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


class UpdateProbe(L.Callback):
    """Independently of MetacoreCallback: the rate each SGD step applied, -(Δθ·g)/(g·g), read around the step
    with torch's optimizer step pre-hook (θ before) and post-hook (θ after, and the gradient the step used)."""

    def __init__(self) -> None:
        self.used: list[float] = []
        self.grad_norms: list[float] = []

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        params = [p for g in opt.param_groups for p in g["params"]]

        def pre(optimizer, args, kwargs):
            self._before = [p.detach().clone() for p in params]

        def post(optimizer, args, kwargs):
            with torch.no_grad():
                num = sum(((b - p) * p.grad).sum().double() for p, b in zip(params, self._before, strict=True))
                den = sum((p.grad.double() ** 2).sum() for p in params)
            self.used.append(float(num / den))
            self.grad_norms.append(float(den.sqrt()))

        self._handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]


class StepLr(Controller):
    """A known rule, unlike the scheduler's: 2x the initial rate, halved every 4 steps."""

    name = "test-step-lr"

    def act(self, state):
        return {"lr": self.initial["lr"] * 2 * 0.5 ** (state.step // 4)}


def rule(step: int) -> float:
    return LR0 * 2 * 0.5 ** (step // 4)


class Recorder(Controller):
    """A gradient observer that keeps what it saw: the gradients (a copy), the states, validation losses."""

    name = "test-recorder"
    options = {"val": OptionSpec("val", False, bool, "also ask for a validation batch's loss and gradients")}

    def reset(self, hparams, seed, space, budget):
        super().reset(hparams, seed, space, budget)
        self.grads, self.states, self.val_losses, self.after = [], [], [], 0

    def observe_gradients(self, ctx):
        self.grads.append([g.detach().clone() for g in ctx.grads])
        if self.config["val"]:
            self.val_losses.append(ctx.val_loss_and_grads())

    def act(self, state):
        self.states.append(state)
        return {}

    def after_step(self, ctx):
        self.after += 1


def fit(tmp_path, callbacks, module=None, data=None, max_steps=12, ckpt_path=None, logger=False, **trainer_args):
    trainer_args.setdefault("enable_checkpointing", False)
    trainer_args.setdefault("num_sanity_val_steps", 0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        deterministic=True, **trainer_args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module or Net(), datamodule=data or EXAMPLE.Digits(batch_size=32, shuffle=False),
                    ckpt_path=ckpt_path)
    finally:
        torch.set_num_threads(threads)
    return trainer


def test_override_uses_the_controllers_rate_not_the_schedulers(tmp_path):
    cb, probe = MetacoreCallback(StepLr), UpdateProbe()
    trainer = fit(tmp_path, [cb, probe], module=Net("step"))
    assert probe.used == pytest.approx([rule(s) for s in range(12)], rel=1e-4)
    sched = [LR0 * 0.7 ** s for s in range(12)]
    assert all(abs(u - s) > 0.1 * s for u, s in zip(probe.used[1:], sched[1:], strict=True))
    # the scheduler continued from its own values: the callback put them back after every step
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(LR0 * 0.7 ** 12)
    assert [s for s, _ in cb.history] == list(range(12))
    assert [h["lr_used"] for _, h in cb.history] == pytest.approx(probe.used, rel=1e-4)


def test_scale_multiplies_the_schedule(tmp_path):
    probe = UpdateProbe()
    fit(tmp_path, [MetacoreCallback(StepLr, schedule="scale"), probe], module=Net("step"))
    assert probe.used == pytest.approx([rule(s) / LR0 * LR0 * 0.7 ** s for s in range(12)], rel=1e-4)


def test_hypergrad_moves_the_rate_each_step(tmp_path):
    cb, probe = MetacoreCallback("hypergrad"), UpdateProbe()
    fit(tmp_path, [cb, probe])
    assert len(probe.used) == 12 and all(math.isfinite(u) and u > 0 for u in probe.used)
    assert len({round(u, 8) for u in probe.used}) > 6 and max(abs(u - LR0) for u in probe.used) > 1e-3 * LR0
    assert [h["lr_used"] for _, h in cb.history] == pytest.approx(probe.used, rel=1e-4)


def test_accumulation_and_clipping(tmp_path):
    """Accumulated over 2 batches, clipped to norm 0.05: one controller call per optimizer step; it sees the
    accumulated gradient (the mean of the two batches'), unscaled and not yet clipped; the rate is still its own."""
    cb, probe = MetacoreCallback(Recorder), UpdateProbe()
    cb2 = MetacoreCallback(StepLr)
    module = Net()
    start = copy.deepcopy(module.net)
    fit(tmp_path, [cb, probe], module=module, max_steps=6, accumulate_grad_batches=2, gradient_clip_val=0.05,
        log_every_n_steps=2)
    rec = cb.controller
    # the loss it sees: the mean over the logging interval's batches (2 steps x 2 batches), not divided by 2
    assert rec.states[2].train_losses == pytest.approx([sum(module.train_logged[:4]) / 4], rel=1e-6)
    assert len(rec.grads) == len(rec.states) == rec.after == len(probe.used) == 6
    assert [s.step for s in rec.states] == list(range(6))
    data = EXAMPLE.Digits(batch_size=32, shuffle=False)
    data.setup()
    x, y = data.train.tensors
    loss = (F.cross_entropy(start(x[:32]), y[:32]) + F.cross_entropy(start(x[32:64]), y[32:64])) / 2
    expected = torch.autograd.grad(loss, list(start.parameters()))
    for seen, want in zip(rec.grads[0], expected, strict=True):
        torch.testing.assert_close(seen, want, rtol=1e-4, atol=1e-6)
    seen_norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in rec.grads[0]])))
    assert seen_norm > 0.1 and probe.grad_norms[0] == pytest.approx(0.05, rel=1e-3)  # clipped after it looked
    assert probe.used == pytest.approx([LR0] * 6, rel=1e-4)
    probe2 = UpdateProbe()
    fit(tmp_path / "b", [cb2, probe2], max_steps=6, accumulate_grad_batches=2, gradient_clip_val=0.05)
    assert probe2.used == pytest.approx([rule(s) for s in range(6)], rel=1e-4)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_gradients_are_unscaled(tmp_path, precision):
    from lightning.pytorch.plugins import MixedPrecision

    ref = MetacoreCallback(Recorder)
    fit(tmp_path / "ref", [ref], max_steps=2)
    cb = MetacoreCallback(Recorder)
    fit(tmp_path, [cb], max_steps=2, plugins=[MixedPrecision(precision, "cpu")])

    def norm(grads):
        return float(torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads])))

    # fp16 scales the loss by 2**16 before backward; the controller must see the gradient, not the scaled one
    assert norm(cb.controller.grads[0]) == pytest.approx(norm(ref.controller.grads[0]), rel=0.05)


def test_resume_continues_the_controllers_trajectory_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = lambda: EXAMPLE.Digits(batch_size=64, shuffle=False)  # noqa: E731
    probe = data()
    probe.setup()
    epoch = len(probe.train) // 64  # steps per epoch (drop_last): the checkpoint is written after the first one
    full = MetacoreCallback("hypergrad")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    fit(tmp_path / "a", [full, ckpt], data=data(), max_steps=2 * epoch, enable_checkpointing=True)
    path = next(p for p in (tmp_path / "ckpt").iterdir() if f"step={epoch}" in p.name)
    saved = torch.load(path, weights_only=True)  # the callback's state is tensors and plain values
    assert full.state_key in saved["callbacks"]

    resumed = MetacoreCallback("hypergrad")
    fit(tmp_path / "b", [resumed], data=data(), max_steps=2 * epoch, ckpt_path=path)
    lrs = lambda cb: [h["lr_used"] for _, h in cb.history]  # noqa: E731
    assert [s for s, _ in resumed.history] == list(range(epoch, 2 * epoch))
    assert lrs(resumed) == lrs(full)[epoch:]  # exactly: same weights, optimizer, controller state, batches

    # without the controller's state the trajectory is not the same: the test can tell
    del saved["callbacks"][full.state_key]
    torch.save(saved, tmp_path / "bare.ckpt")
    fresh = MetacoreCallback("hypergrad")
    fit(tmp_path / "c", [fresh], data=data(), max_steps=2 * epoch, ckpt_path=tmp_path / "bare.ckpt")
    assert lrs(fresh) != lrs(full)[epoch:]


def test_monitor_feeds_the_validation_metric(tmp_path):
    cb, module = MetacoreCallback(Recorder, monitor="val_loss"), Net()
    fit(tmp_path, [cb], module=module, max_steps=12, val_check_interval=4, num_sanity_val_steps=2,
        log_every_n_steps=2)
    states = cb.controller.states
    assert len(module.val_logged) == 3  # after steps 4, 8, 12 (the sanity check is not a validation)
    assert states[5].primary_metric == "val_loss" and states[5].direction == "min"
    assert states[3].val_history == () and states[4].val_history == (module.val_logged[0],)
    assert states[8].val_history == tuple(module.val_logged[:2])
    assert states[8].val_metrics["val_loss"] == module.val_logged[1]
    assert len(states[4].train_losses) == 2 and all(math.isfinite(v) for v in states[4].train_losses)
    assert states[-1].budget == 12

    with pytest.raises(ControllerError, match="val_los.*val_loss"):
        fit(tmp_path / "b", [MetacoreCallback(Recorder, monitor="val_los")], max_steps=4, val_check_interval=4)


def test_validation_gradients_come_from_the_validation_loader(tmp_path):
    cb, module = MetacoreCallback(Recorder(val=True)), Net()
    fit(tmp_path, [cb], module=module, max_steps=3)
    rec = cb.controller
    assert len(rec.val_losses) == 3
    data = EXAMPLE.Digits(batch_size=32, shuffle=False)
    data.setup()
    x, y = next(iter(data.val_dataloader()))
    loss0, grads0 = rec.val_losses[0]
    # the first validation batch, on the weights before the first step (the initial ones)
    torch.manual_seed(0)
    start = Net().net
    want = F.cross_entropy(start(x), y)
    assert float(loss0) == pytest.approx(float(want), rel=1e-5)
    assert len(grads0) == len(list(start.parameters()))
    assert rec.grads[0][0].abs().sum() > 0 and not torch.equal(rec.grads[0][0], grads0[0])


def test_mlflow_logger_holds_the_trajectory(tmp_path):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="lightning-test", tracking_uri=uri)
    cb = MetacoreCallback("hypergrad")
    fit(tmp_path, [cb], max_steps=20, logger=logger, log_every_n_steps=5)
    client = MlflowClient(uri)
    lr = client.get_metric_history(logger.run_id, "hparam/lr")
    loss = client.get_metric_history(logger.run_id, "train_loss")
    assert len(lr) == 4 and [m.step for m in lr] == [m.step for m in loss]  # beside the module's own losses
    used = dict(cb.history)
    assert len({m.value for m in lr}) > 1
    for m in lr:  # Lightning's step index is the batch's (0-based): the rate that step used
        assert m.value == pytest.approx(used[m.step]["lr"], rel=1e-6)
    names = set(client.get_run(logger.run_id).data.metrics)
    assert {"train_loss", "hparam/lr"} <= names and any(n.startswith("controller/") for n in names)


def test_manual_optimization_is_refused(tmp_path):
    with pytest.raises(UsageError, match="manual optimization"):
        fit(tmp_path, [MetacoreCallback(StepLr)], module=Net(manual=True), max_steps=2)


def test_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="schedule"):
        MetacoreCallback(StepLr, schedule="both")
    with pytest.raises(UsageError, match="direction"):
        MetacoreCallback(StepLr, direction="up")
    with pytest.raises(UsageError):
        MetacoreCallback("hypergrad", hyper_lr="fast")


def test_import_without_lightning_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "metacore.integrations.lightning"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    with pytest.raises(ImportError, match=r'pip install "metacore\[lightning\]"'):
        importlib.import_module("metacore.integrations.lightning")


def test_the_docs_show_the_example():
    import re

    page = (REPO / "docs" / "lightning.md").read_text()
    shown = re.search(r"## A complete example.*?```python\n(.*?)```", page, re.S).group(1)
    source = (REPO / "examples" / "lightning_digits.py").read_text()
    assert source.endswith(shown) and source[: -len(shown)].strip().startswith('"""')  # the file, less its docstring
    assert sum("# <- the added line" in line for line in shown.splitlines()) == 1


@pytest.mark.slow
def test_the_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # its checkpoints go under ./mlflow_runs
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = EXAMPLE.main(max_epochs=1, tracking_uri=uri)
    finally:
        torch.set_num_threads(threads)
    assert 0.0 <= result["test_acc"] <= 1.0 and math.isfinite(result["test_loss"])
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("digits-lightning").experiment_id])[0]
    assert {"train_loss", "val_loss", "hparam/lr", "controller/cos_lr"} <= set(run.data.metrics)


@pytest.mark.slow
def test_results_script_runs_end_to_end(tmp_path):
    import json
    import os
    import subprocess

    out = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, "benchmarks/lightning_hypergrad.py", "--seeds", "1", "--epochs", "1",
                           "--lrs", "1e-2", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["arm"], r["steps"]) for r in runs] == [("constant", 16), ("hypergrad", 16)]
    assert "| 0.01 | hypergrad |" in proc.stdout


def test_any_registered_controller_autolr(tmp_path):
    from metacore.core.registry import load_registry

    if "autolr" not in load_registry().controllers:
        pytest.skip("the autolr controller is not registered")
    cb, probe = MetacoreCallback("autolr"), UpdateProbe()
    fit(tmp_path, [cb, probe], max_steps=60, log_every_n_steps=2)
    # its range test: the rate starts at 1e-2 x the initial one and grows every step (no per-step loss or way back
    # from this integration: it reads the logged loss means)
    assert probe.used[0] == pytest.approx(LR0 * 1e-2, rel=1e-4)
    growth = 10 ** (8 / (0.15 * 60))  # 8 decades over the first 15% of the budget (search_frac)
    assert probe.used[1:4] == pytest.approx([LR0 * 1e-2 * growth ** k for k in range(1, 4)], rel=1e-4)
    assert [h["lr_used"] for _, h in cb.history] == pytest.approx(probe.used, rel=1e-4)
