"""MetacoreCallback on a real ``transformers.Trainer``: a tiny random BERT, generated data, CPU, offline."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from metacore import Controller  # noqa: E402
from metacore.core.errors import ControllerError, UsageError  # noqa: E402
from metacore.integrations.huggingface import MetacoreCallback, optimizer_hparam_space  # noqa: E402

VOCAB, SEQ, N = 64, 8, 96
LR0, STEPS, WARMUP = 1e-2, 12, 3


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label says whether token 7 occurs (learnable by a tiny BERT)."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, VOCAB, (n, SEQ), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        self.ids[flip, torch.randint(1, SEQ, (int(flip.sum()),), generator=gen)] = 7
        self.labels = flip.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


class LrProbe(TrainerCallback):
    """Records, independently of MetacoreCallback, the learning rate each optimizer step ran with."""

    def __init__(self) -> None:
        self.used: list[float] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.register_step_pre_hook(lambda opt, a, kw: self.used.append(float(opt.param_groups[0]["lr"])))


def train(tmp_path, callbacks, optim="sgd", max_grad_norm=1.0, **extra):
    probe = LrProbe()
    extra.setdefault("report_to", "none")
    extra.setdefault("save_strategy", "no")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=STEPS,
                             learning_rate=LR0, warmup_steps=WARMUP, lr_scheduler_type="linear", logging_steps=3,
                             use_cpu=True, seed=0, disable_tqdm=True,
                             optim=optim, max_grad_norm=max_grad_norm, dataloader_num_workers=0, **extra)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(N, 0), callbacks=[*callbacks, probe])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention when test processes share the cores
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return trainer, probe.used


class StepLr(Controller):
    """A known learning-rate rule (2 x initial, halved every 4 steps) that differs from warmup + linear decay."""

    name = "test-step-lr"

    def act(self, state):
        return {"lr": self.initial["lr"] * 2 * 0.5 ** (state.step // 4)}


class SgdChecker(Controller):
    """A GradientObserver that checks it runs between backward and the step: theta_new = theta - lr * grad (SGD)."""

    name = "test-sgd-checker"

    def reset(self, hparams, seed, space, budget):
        super().reset(hparams, seed, space, budget)
        self.checked = 0
        self.max_err = 0.0
        self.lr = hparams["lr"]

    def observe_gradients(self, ctx):
        assert ctx.grads and all(g is not None for g in ctx.grads)
        assert any(float(g.abs().sum()) > 0 for g in ctx.grads)
        self.before = [p.detach().clone() for p in ctx.params]
        self.grads = [g.detach().clone() for g in ctx.grads]

    def act(self, state):
        self.lr = self.initial["lr"] * (1.5 if state.step % 2 else 0.5)
        return {"lr": self.lr}

    def after_step(self, ctx):
        for p, before, g in zip(ctx.params, self.before, self.grads, strict=True):
            expected = before - self.lr * g
            self.max_err = max(self.max_err, float((p.detach() - expected).abs().max()))
        self.checked += 1

    def diagnostics(self):
        return {"checked": float(self.checked)}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The learning rates of a run without the callback: the scheduler's (warmup, then linear decay)."""
    return train(tmp_path_factory.mktemp("plain"), [])[1]


def test_lr_used_is_the_controllers_not_the_schedulers(tmp_path, plain):
    cb = MetacoreCallback(StepLr)
    trainer, used = train(tmp_path / "b", [cb])
    assert len(plain) == len(used) == STEPS
    expected = [LR0 * 2 * 0.5 ** (s // 4) for s in range(STEPS)]
    assert used == pytest.approx(expected, rel=1e-9)
    assert plain[0] == 0.0 and plain[WARMUP] == pytest.approx(LR0)  # the scheduler: warmup from 0 then decay
    assert sum(abs(a - b) > 1e-6 for a, b in zip(plain, used, strict=True)) >= STEPS - 1
    # Trainer's own logs report the rate actually used, and carry the trajectory
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert train_logs
    for entry in train_logs:
        step = entry["step"]
        assert entry["learning_rate"] == pytest.approx(expected[step - 1])
        assert entry["hparam/lr"] == pytest.approx(expected[step - 1])
    assert [s for s, _ in cb.history] == list(range(STEPS))


def test_gradient_observer_sees_final_gradients_before_the_step(tmp_path):
    cb = MetacoreCallback(SgdChecker)
    trainer, used = train(tmp_path, [cb], max_grad_norm=0.5)
    ctrl = cb.controller
    assert ctrl.checked == STEPS
    assert ctrl.max_err < 1e-6  # the gradients it saw (after clipping) are exactly what SGD applied
    assert used == pytest.approx([LR0 * (1.5 if s % 2 else 0.5) for s in range(STEPS)])
    assert trainer.state.log_history[-2]["controller/checked"] > 0


def test_scale_mode_multiplies_the_schedule(tmp_path, plain):
    _, used = train(tmp_path / "b", [MetacoreCallback(StepLr, schedule="scale")])
    expected = [p * 2 * 0.5 ** (s // 4) for s, p in enumerate(plain)]
    assert used == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_adamw_groups_keep_their_ratios(tmp_path):
    class WdUp(Controller):
        name = "test-wd"

        def act(self, state):
            return {"weight_decay": 0.05, "beta1": 0.8}

    cb = MetacoreCallback(WdUp)
    trainer, _ = train(tmp_path, [cb], optim="adamw_torch", weight_decay=0.01)
    groups = trainer.optimizer.param_groups
    decays = sorted({g["weight_decay"] for g in groups})
    assert decays == [0.0, 0.05]  # the no-decay group (biases, norms) stays at 0
    assert all(g["betas"][0] == 0.8 for g in groups)
    assert {s.name for s in cb.space} == {"lr", "beta1", "weight_decay"}


def test_hypergrad_drives_a_tiny_bert(tmp_path):
    from metacore.core.registry import load_registry

    if "hypergrad" not in load_registry().controllers:
        pytest.skip("the hypergrad controller is not registered")
    trainer_plain, plain = train(tmp_path / "a", [], optim="adamw_torch")
    cb = MetacoreCallback("hypergrad")
    trainer, used = train(tmp_path / "b", [cb], optim="adamw_torch")
    assert len(used) == STEPS and all(math.isfinite(v) and v > 0 for v in used)
    assert sum(abs(a - b) > 1e-9 for a, b in zip(plain, used, strict=True)) >= STEPS - 1  # not the scheduler's
    assert len(set(used)) > STEPS // 2 and max(abs(u - LR0) for u in used) > 1e-3 * LR0  # it adapts, step by step
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(p.detach().abs().max().item()) for p in trainer.model.parameters())
    assert [e["learning_rate"] for e in trainer.state.log_history if "loss" in e] == pytest.approx(
        [used[e["step"] - 1] for e in trainer.state.log_history if "loss" in e])


class ValPeek(Controller):
    """Asks for validation gradients every step; checks they leave the training gradients alone."""

    name = "test-val-peek"

    def reset(self, hparams, seed, space, budget):
        super().reset(hparams, seed, space, budget)
        self.losses = []

    def observe_gradients(self, ctx):
        before = [g.clone() for g in ctx.grads]
        loss, grads = ctx.val_loss_and_grads()
        assert len(grads) == len(ctx.params) and all(g.shape == p.shape for g, p in zip(grads, ctx.params, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(before, ctx.grads, strict=True))
        self.losses.append(float(loss))

    def after_step(self, ctx):
        pass


def test_validation_gradients_come_from_val_data(tmp_path):
    val = torch.utils.data.DataLoader(Tokens(32, 1), batch_size=8)
    cb = MetacoreCallback(ValPeek, val_data=val)
    train(tmp_path / "a", [cb])
    assert len(cb.controller.losses) == STEPS and all(math.isfinite(v) for v in cb.controller.losses)
    assert len(set(cb.controller.losses)) > 1  # batches cycle and the model moves
    with pytest.raises(ControllerError, match="val_data"):
        train(tmp_path / "b", [MetacoreCallback(ValPeek)])


class Decay(Controller):
    """Stateful: lr = initial x 0.9^calls, with the call count in its state."""

    name = "test-decay"

    def reset(self, hparams, seed, space, budget):
        super().reset(hparams, seed, space, budget)
        self.calls = 0

    def act(self, state):
        self.calls += 1
        return {"lr": self.initial["lr"] * 0.9**self.calls}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


def test_resuming_a_trainer_checkpoint_continues_the_controller(tmp_path):
    _, whole = train(tmp_path, [MetacoreCallback(Decay)], save_strategy="steps", save_steps=6)
    assert whole == pytest.approx([LR0 * 0.9 ** (s + 1) for s in range(STEPS)])
    assert (tmp_path / "out" / "checkpoint-6" / "metacore_controller.pt").is_file()
    probe = LrProbe()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=STEPS,
                             learning_rate=LR0, warmup_steps=WARMUP, logging_steps=3, use_cpu=True,
                             save_strategy="no", seed=0, disable_tqdm=True, optim="sgd", report_to="none")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(N, 0),
                      callbacks=[MetacoreCallback(Decay), probe])
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    assert probe.used == pytest.approx(whole[6:])


def test_bad_arguments_are_clear():
    with pytest.raises(UsageError, match="schedule"):
        MetacoreCallback(StepLr, schedule="sometimes")
    with pytest.raises(UsageError, match="unknown controller"):
        MetacoreCallback("no-such-controller")
    with pytest.raises(UsageError, match="unknown option"):
        MetacoreCallback("static", nonsense=1)
    opt = torch.optim.SGD(tiny_bert().parameters(), lr=0.1)
    with pytest.raises(UsageError, match="does not have"):
        optimizer_hparam_space(opt, {"beta1": (0.1, 0.9)})
    space = optimizer_hparam_space(opt, {"lr": (1e-4, 1.0)})
    assert (space["lr"].low, space["lr"].high, space["lr"].default) == (1e-4, 1.0, 0.1)


@pytest.mark.slow
def test_trajectory_reaches_mlflow_when_it_is_the_reporter(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-callback")
    try:
        _, used = train(tmp_path, [MetacoreCallback(StepLr)], report_to=["mlflow"], run_name="step-lr")
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)  # Trainer's MLflowCallback set the process-wide URI; leave none behind
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("hf-callback")
    (run,) = client.search_runs([exp.experiment_id])
    trajectory = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "hparam/lr")}
    reported = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "learning_rate")}
    assert sorted(trajectory) == list(range(3, STEPS + 1, 3))
    for step, value in trajectory.items():
        assert value == pytest.approx(used[step - 1]) and reported[step] == pytest.approx(used[step - 1])
