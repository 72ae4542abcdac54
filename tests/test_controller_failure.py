"""A controller that fails mid-run: its run ends FAILED with the message, checkpoints kept, the baseline still runs,
``--json`` prints one object with the error, exit 1 for a plugin's bug and 2 for a refused value; --resume continues."""

import json
import math

import pytest

from metacore import Controller
from metacore.app.plan import plan_resume
from metacore.app.runner import RunFailed, RunRequest, execute, plan_run
from metacore.testing import TinyTask, make_registry
from tests.conftest import fake_distribution, with_path

FLAKY = """
from metacore import Controller, OptionSpec, hookimpl

class Flaky(Controller):
    name = "flaky"
    options = {"at": OptionSpec("at", 25, int, "the step whose act raises", 0)}

    def act(self, state):
        if state.step == self.config["at"] and BROKEN:
            raise RuntimeError("boom")
        return {}

BROKEN = True

@hookimpl
def metacore_register_controllers(register):
    register(Flaky)
"""


@pytest.mark.slow
def test_controller_raising_mid_run_fails_its_run_keeps_the_baseline_and_resumes(cli, tmp_path):
    from mlflow.tracking import MlflowClient

    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "flaky-plugin", "flaky_mod", FLAKY)
    env = {"PYTHONPATH": with_path(site)}
    res = cli("run", "--task", "digits", "--controller", "flaky", "--preset", "smoke", "--steps", "30",
              "--checkpoint-interval", "10", "--json", env=env)
    assert res.returncode == 1, res.stderr  # a bug in the plugin
    summary = json.loads(res.stdout)  # one object, with the error
    assert summary["error"] == "controller 'flaky' failed at step 25: RuntimeError: boom"
    failed, baseline = summary["runs"]
    assert failed["status"] == "FAILED" and failed["steps"] == 25 and failed["error_kind"] == "plugin"
    assert failed["checkpoint"].endswith("step-000000020.pt")
    assert baseline["role"] == "baseline" and baseline["status"] == "FINISHED" and baseline["steps"] == 30
    assert baseline["final"]["val/accuracy"] >= 0
    parent = summary["parent_run_id"]
    assert f"metacore run --resume {parent}" in res.stderr and "fix controller 'flaky' (plugin 'flaky-plugin')" \
        in res.stderr and "Traceback" not in res.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow_runs/mlflow.db")
    run = client.get_run(failed["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["metacore.error"] == summary["error"]
    assert client.get_run(parent).info.status == "FAILED"

    (site / "flaky_mod.py").write_text(FLAKY.replace("BROKEN = True", "BROKEN = False"))  # the fix
    res = cli("run", "--resume", parent, "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert "failed last time" in res.stderr and "continuing from step 20" in res.stderr
    resumed = json.loads(res.stdout)
    assert [r["status"] for r in resumed["runs"]] == ["FINISHED", "FINISHED"] and "error" not in resumed
    steps = [m.step for m in client.get_metric_history(failed["run_id"], "train/loss")]
    assert steps == list(range(5, 31, 5))  # every logged step once
    assert client.get_run(parent).info.status == "FINISHED"


class NaNLr(Controller):
    name = "nan-lr"

    def act(self, state):
        return {"lr": math.nan} if state.step == 7 else {}


def test_refused_value_is_bad_input_and_the_baseline_still_reports(memory_tracker, tmp_path):
    registry = make_registry(TinyTask, NaNLr, builtins=True)
    plan = plan_run(RunRequest(task="tiny", controller="nan-lr", preset="smoke", steps=12,
                               checkpoint_dir=str(tmp_path / "ckpt"), device="cpu"), registry)
    with pytest.raises(RunFailed) as info:
        execute(plan, memory_tracker)
    assert info.value.bad_input  # exit 2
    summary = info.value.summary
    assert summary["error"] == "controller 'nan-lr' failed at step 7: controller nan-lr proposed non-finite lr=nan"
    assert [r["status"] for r in summary["runs"]] == ["FAILED", "FINISHED"]
    statuses = {r["name"]: r["status"] for r in memory_tracker.runs.values()}
    assert statuses["nan-lr vs static"] == "FAILED" and statuses["static seed 0 (baseline)"] == "FINISHED"


class Flaky(Controller):
    name = "flaky"
    broken = True

    def act(self, state):
        if state.step == 15 and Flaky.broken:
            raise RuntimeError("boom")
        return {}


def test_plugin_bug_fails_the_run_with_its_checkpoint_then_resume_finishes_it(memory_tracker, tmp_path, monkeypatch):
    registry = make_registry(TinyTask, Flaky, builtins=True)
    plan = plan_run(RunRequest(task="tiny", controller="flaky", preset="smoke", steps=20, checkpoint_interval=10,
                               checkpoint_dir=str(tmp_path / "ckpt"), device="cpu"), registry)
    with pytest.raises(RunFailed) as info:
        execute(plan, memory_tracker)
    assert not info.value.bad_input  # exit 1
    summary = info.value.summary
    failed, baseline = summary["runs"]
    assert failed["error"] == "controller 'flaky' failed at step 15: RuntimeError: boom"
    assert failed["checkpoint"].endswith("step-000000010.pt") and baseline["status"] == "FINISHED"
    assert summary["resume"].startswith(f"metacore run --resume {summary['parent_run_id']}")
    monkeypatch.setattr(Flaky, "broken", False)  # the fix
    parent = summary["parent_run_id"]
    resumed = execute(plan_resume(parent, memory_tracker, registry), memory_tracker, resume_parent=parent)
    assert [r["status"] for r in resumed["runs"]] == ["FINISHED", "FINISHED"]
    assert resumed["runs"][0]["steps"] == 20
    logged = [s for s, _ in memory_tracker.history(failed["run_id"], "train/loss")]
    assert logged == sorted(set(logged)) and logged[-1] == 20  # no step twice
