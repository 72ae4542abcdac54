"""Optimizer plugins: every built-in trains digits and resumes exactly, the hook contract, the error cases."""

from __future__ import annotations

import json
import math

import pytest

from metacore.app.runner import RunRequest, plan_run
from metacore.core.errors import UsageError
from metacore.core.hookspecs import hookimpl
from metacore.core.optimizer import Optimizer
from metacore.core.registry import load_registry
from tests.conftest import run_cli

BUILTINS = sorted(load_registry(entry_points=False).optimizers)
SMOKE = 30  # steps: checkpoints at 10 and 20, a "kill" at 25


def _plan(optimizer: str, registry=None, **sets):
    req = RunRequest(task="digits", controller="static", baseline=None, preset="smoke", steps=SMOKE,
                     optimizer=optimizer, sets={k: str(v) for k, v in sets.items()}, device="cpu")
    return plan_run(req, registry)


def _trainer(plan, tmp_path, controller=None, tracker=None, run_id=None):
    from metacore.controllers.static import StaticController
    from metacore.core.task import TaskContext
    from metacore.core.trainer import Trainer, TrainerConfig

    ctx = TaskContext(plan.preset, dict(plan.options), 0, "cpu", None, dict(plan.hparams))
    cfg = TrainerConfig(budget=SMOKE, log_interval=5, eval_interval=10, checkpoint_interval=10,
                        checkpoint_dir=tmp_path)
    return Trainer(plan.task, controller or StaticController(), ctx, plan.hparams, cfg, tracker=tracker,
                   run_id=run_id)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_trains_digits_and_resumes_exactly_after_a_kill(name, tmp_path, memory_tracker):
    import torch

    from metacore.core.checkpoint import load_latest

    plan = _plan(name)
    rid = memory_tracker.start_run("e", name)
    straight = _trainer(plan, tmp_path / "a", tracker=memory_tracker, run_id=rid)
    first = straight.run()
    assert first.steps == SMOKE and not first.diverged
    assert all(math.isfinite(v) for v in first.final.values())
    if plan.optimizer.lr_free:
        eff = memory_tracker.history(rid, "hparam/effective_lr")
        assert eff and all(math.isfinite(v) and v > 0 for _, v in eff)

    killed = _trainer(plan, tmp_path / "b")
    killed.advance(25)  # checkpoints at 10 and 20; what happened after step 20 is lost with the process
    del killed
    path, payload = load_latest(tmp_path / "b")  # torch.load(weights_only=True)
    assert payload["step"] == 20
    resumed = _trainer(plan, tmp_path / "c")
    resumed.restore(payload)
    second = resumed.run()
    assert second.final == first.final and second.hparams_final == first.hparams_final
    for key, value in _weights(straight).items():
        assert torch.equal(value, _weights(resumed)[key]), key


def test_effective_lr_follows_the_estimate(memory_tracker, tmp_path):
    """Prodigy's logged step size is d·lr: it moves from d0 while lr stays the multiplier 1.0."""
    rid = memory_tracker.start_run("e", "prodigy")
    _trainer(_plan("prodigy"), tmp_path, tracker=memory_tracker, run_id=rid).run()
    eff = [v for _, v in memory_tracker.history(rid, "hparam/effective_lr")]
    assert [v for _, v in memory_tracker.history(rid, "hparam/lr")] == [1.0] * len(eff)
    assert eff[-1] > 10 * 1e-6  # grew from d0 = 1e-6


def test_divergence_guard_with_an_lr_free_optimizer(tmp_path):
    from metacore.core.controller import Controller

    class Blowup(Controller):
        name = "blowup"

        def act(self, state):
            return {"lr": 100.0} if state.step == 6 else {}

    trainer = _trainer(_plan("dadapt-sgd", d0=1.0), tmp_path, controller=Blowup())
    result = trainer.run()
    assert result.rollbacks >= 1
    assert all(math.isfinite(v) for v in result.final.values())
    assert result.hparams_final["lr"] < 100.0


# ---------------------------------------------------------------------------------------------------- the hook
class ScaledSGD(Optimizer):
    """A third party's optimizer: SGD whose step is lr times a fixed option."""

    name = "scaled-sgd"
    description = "SGD with a scale option (test plugin)"
    options = {}

    def hparams(self):
        from metacore.core.hparams import HParamSpec

        return [HParamSpec("lr", 0.05, 1e-6, 10.0, log=True)]

    def build(self, model, hparams, ctx):
        import torch

        return torch.optim.SGD(model.parameters(), lr=hparams["lr"])

    def effective_lr(self, optimizer):
        return optimizer.param_groups[0]["lr"] * 2.0


class _Plugin:
    __name__ = "test-optimizer-plugin"

    @staticmethod
    @hookimpl
    def metacore_register_optimizers(register):
        register(ScaledSGD)


def test_a_plugin_optimizer_registers_and_trains(tmp_path, memory_tracker):
    from metacore.core.registry import DEFAULT_PLUGINS, build_registry, get_plugin_manager

    registry = build_registry(get_plugin_manager([*DEFAULT_PLUGINS, _Plugin()], entry_points=False))
    entry = registry.optimizer("scaled-sgd")
    assert entry.plugin == "test-optimizer-plugin" and entry.obj is ScaledSGD
    plan = _plan("scaled-sgd", registry)
    assert plan.hparams["lr"] == 0.05 and "momentum" not in plan.hparams  # the plugin's space, not the task's
    rid = memory_tracker.start_run("e", "r")
    result = _trainer(plan, tmp_path, tracker=memory_tracker, run_id=rid).run()
    assert result.steps == SMOKE
    assert memory_tracker.history(rid, "hparam/effective_lr")[0][1] == pytest.approx(0.1)
    with pytest.raises(UsageError, match="does not take 'momentum'.*task digits"):
        _plan("scaled-sgd", registry, momentum=0.5)


def test_registering_a_non_optimizer_is_a_named_fault_and_skipped():
    from metacore.core.registry import build_registry, get_plugin_manager

    class Bad:
        __name__ = "bad-optimizer-plugin"

        @staticmethod
        @hookimpl
        def metacore_register_optimizers(register):
            register(dict)

    registry = build_registry(get_plugin_manager([Bad()], entry_points=False))
    assert "dict" not in registry.optimizers
    (name, reason), = registry.failures.items()
    assert "metacore_register_optimizers" in reason and "not a Optimizer subclass" in reason


def test_a_task_that_restricts_its_optimizers(tmp_path):
    from metacore.plugins.digits import DigitsTask
    from metacore.testing import make_registry

    class SgdOnly(DigitsTask):
        name = "digits-sgd-only"
        optimizers = ("sgd",)

    registry = make_registry(SgdOnly, builtins=True)
    req = RunRequest(task="digits-sgd-only", controller="static", preset="smoke", optimizer="prodigy")
    with pytest.raises(UsageError, match="task digits-sgd-only cannot train with optimizer prodigy"):
        plan_run(req, registry)


# ---------------------------------------------------------------------------------------------------- bad input
def test_option_errors_name_task_and_optimizer():
    plan = _plan("prodigy", d0=1e-5)
    assert plan.optimizer.config["d0"] == 1e-5
    with pytest.raises(UsageError, match="'reps_rel'.*task digits.*optimizer prodigy options"):
        _plan("prodigy", reps_rel=1e-4)
    with pytest.raises(UsageError, match="optimizer sf-sgd: Momentum"):
        _plan("sf-sgd", momentum=0.0)  # the package rejects it; caught before anything is written


def test_hypergrad_on_an_lr_free_optimizer_says_what_it_adapts_or_refuses():
    req = RunRequest(task="digits", controller="hypergrad", preset="smoke", optimizer="dadapt-sgd")
    assert "multiplier of D-Adaptation" in plan_run(req).notes[0]
    req.controller_sets = {"adapt": "all"}
    with pytest.raises(UsageError, match="hypergrad adapts momentum.*not on optimizer dadapt-sgd"):
        plan_run(req)


def test_cli_unknown_optimizer_lists_the_known_ones(tmp_path):
    res = run_cli("run", "--task", "digits", "--controller", "static", "--preset", "smoke",
                  "--optimizer", "nope", cwd=tmp_path)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert "unknown optimizer 'nope'" in line and "prodigy" in line and "sgd" in line
    assert "Traceback" not in res.stderr and not (tmp_path / "mlflow_runs" / "mlflow.db").exists()


HIDE_PRODIGY = (
    "import sys, importlib.abc\n"
    "class Hide(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == 'prodigyopt':\n"
    "            raise ModuleNotFoundError(name)\n"
    "sys.meta_path.insert(0, Hide())\n"
    "import importlib.util\n"
    "real = importlib.util.find_spec\n"
    "importlib.util.find_spec = lambda n, *a: None if n == 'prodigyopt' else real(n, *a)\n"
    "from metacore.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_cli_missing_package_names_the_pip_install(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", HIDE_PRODIGY, "run", "--task", "digits", "--controller", "static",
                          "--preset", "smoke", "--optimizer", "prodigy"], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "pip install prodigyopt" in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr


def test_cli_run_json_and_params_carry_the_optimizer(tmp_path):
    res = run_cli("run", "--task", "digits", "--controller", "hypergrad", "--preset", "smoke", "--steps", "10",
                  "--optimizer", "prodigy", "--set", "d0=1e-5", "--json",
                  "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)  # the package's prints never reach stdout
    assert {r["optimizer"] for r in summary["runs"]} == {"prodigy"}
    assert summary["runs"][0]["optimizer_options"]["d0"] == 1e-5
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    for r in summary["runs"]:
        params = client.get_run(r["run_id"]).data.params
        assert params["optimizer"] == "prodigy" and params["optimizer.d0"] == "1e-05"
        assert "hparam/effective_lr" in client.get_run(r["run_id"]).data.metrics


def test_bench_sweeps_optimizers_as_a_grid():
    from metacore.app.bench import BenchRequest, parse_grid, plan_bench

    req = BenchRequest(tasks=["digits"], controllers=["hypergrad"], seeds=1, preset="smoke",
                       grid=parse_grid(["optimizer=default,prodigy", "lr=0.5,1.0"]))
    units = plan_bench(req)
    assert [(u.request.optimizer, u.request.sets) for u in units] == [
        ("default", {"lr": "0.5"}), ("default", {"lr": "1.0"}), ("prodigy", {"lr": "0.5"}), ("prodigy", {"lr": "1.0"})]
    assert "optimizer=prodigy" in units[2].label
    with pytest.raises(UsageError, match="unknown optimizer 'nope'"):
        plan_bench(BenchRequest(tasks=["digits"], controllers=["static"], grid={"optimizer": ["nope"]}))
    with pytest.raises(UsageError, match="both in --grid and --optimizer"):
        plan_bench(BenchRequest(tasks=["digits"], controllers=["static"], optimizer="sgd",
                                grid={"optimizer": ["dog"]}))


def test_compare_tells_optimizers_apart():
    from metacore.analysis.compare import compare
    from metacore.core.tracking import MemoryTracker

    tracker = MemoryTracker()
    for optimizer, mae in (("default", 0.5), ("prodigy", 0.4), (None, 0.6)):  # None: a run from before plugins
        params = {"preset": "smoke", "budget_steps": 10, "hparam.lr": 0.01}
        if optimizer:
            params["optimizer"] = optimizer
        rid = tracker.start_run("e", "r", tags={"metacore.role": "controller", "metacore.controller": "static",
                                                "metacore.task": "digits", "metacore.seed": str(int(mae * 10))},
                                params=params)
        tracker.log_metrics(rid, {"test/accuracy": mae}, 10)
        tracker.end_run(rid, "FINISHED")
    rows = compare(tracker, tracker.experiment_runs("e"), "e")["rows"]
    assert sorted((r["condition"], r["n"]) for r in rows) == [("optimizer=default", 2), ("optimizer=prodigy", 1)]


def test_cli_list_shows_optimizers_and_where_they_came_from(tmp_path):
    res = run_cli("list", "optimizers", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["optimizers"]}
    assert set(rows) == set(BUILTINS)
    assert rows["prodigy"]["plugin"] == "metacore.optimizers.plugin" and rows["prodigy"]["requires"] == "prodigyopt"
    assert rows["prodigy"]["lr_free"] and rows["prodigy"]["hparams"]["lr"] == 1.0 and rows["prodigy"]["available"]


@pytest.mark.slow
def test_cli_sigkill_then_resume_is_exact_with_mechanic(tmp_path):
    """Mechanic's converted optimizer state through a real SIGKILL and ``--resume`` (hypergrad on top)."""
    import os
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from tests.test_reliability import THROTTLED  # the real CLI, each step slowed down so the kill lands mid-run

    args = ["run", "--task", "digits", "--controller", "hypergrad", "--preset", "smoke", "--steps", "60",
            "--checkpoint-interval", "10", "--optimizer", "mechanic-sgd", "--json"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = run_cli(*args, cwd=tmp_path / "a")
    assert straight.returncode == 0, straight.stderr
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-c", THROTTLED, *args], cwd=tmp_path / "b", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "b" / "mlflow_runs" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(ckpts.glob("*/step-*.pt")) if ckpts.exists() else []) < 2:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    client = MlflowClient(f"sqlite:///{tmp_path}/b/mlflow_runs/mlflow.db")
    exp = client.get_experiment_by_name("digits")
    parent = client.search_runs([exp.experiment_id], "tags.`metacore.role` = 'parent'")[0].info.run_id
    resumed = run_cli("run", "--resume", parent, "--json", cwd=tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr

    def finals(res):
        return [(r["role"], r["optimizer"], r["final"], r["hparams_final"]) for r in json.loads(res.stdout)["runs"]]

    assert finals(resumed) == finals(straight)


def test_the_builtin_sgd_reproduces_the_tasks_own_optimizer(tmp_path):
    """``--optimizer sgd`` on digits (the seed's SGD) inherits the task's hyperparameters and trains identically."""
    import torch

    own, plugin = _trainer(_plan(None), tmp_path / "a"), _trainer(_plan("sgd"), tmp_path / "b")
    assert plugin.hparams == own.hparams
    assert own.run().final == plugin.run().final
    for key, value in own.model.state_dict().items():
        assert torch.equal(value, plugin.model.state_dict()[key]), key


def test_schedule_free_evaluates_at_the_average_and_leaves_training_untouched(tmp_path):
    """On a model with BatchNorm: evaluation runs at Schedule-Free's averaged weights with BatchNorm statistics
    recomputed there, and afterwards the training weights and statistics are exactly what they were."""
    import torch
    import torch.nn as nn

    from metacore.plugins.digits import DigitsTask
    from metacore.testing import make_registry

    class DigitsBN(DigitsTask):
        name = "digits-bn"

        def build_model(self, data, ctx):
            return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 64, 10))

    registry = make_registry(DigitsBN, builtins=True)
    req = RunRequest(task="digits-bn", controller="static", baseline=None, preset="smoke", steps=SMOKE,
                     optimizer="sf-sgd", device="cpu")
    trainer = _trainer(plan_run(req, registry), tmp_path)
    trainer.advance(15)
    before = _weights(trainer)
    seen = {}
    inner = trainer.task.compute_metrics

    def spy(outputs, targets, data):
        seen["bn_mean"] = trainer.model[1].running_mean.clone()
        seen["weight"] = trainer.model[0].weight.detach().clone()
        return inner(outputs, targets, data)

    trainer.task.compute_metrics = spy
    trainer.evaluate("val")
    assert not torch.equal(seen["weight"], before["0.weight"])  # evaluated at x, not at the training point y
    assert not torch.equal(seen["bn_mean"], before["1.running_mean"])  # statistics recomputed at x
    for key, value in _weights(trainer).items():
        assert torch.equal(value, before[key]), key
    dog = plan_run(RunRequest(task="digits-bn", controller="static", preset="smoke", optimizer="dog"), registry)
    model = dog.task.build_model(None, None)
    assert dog.optimizer.reps_rel(model) == 1e-4  # the authors' advice for BatchNorm models
