"""Checkpoints, exact resume, interrupts, divergence, concurrency and the rest of the bad-input matrix."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import fake_distribution as _fake_distribution
from tests.conftest import run_cli, with_path

RUN = ["run", "--task", "digits", "--controller", "cosine", "--preset", "smoke", "--steps", "120",
       "--checkpoint-interval", "20", "--json"]


def _store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow_runs/mlflow.db"


# The real CLI, with each training step slowed down so a signal can land mid-run.
THROTTLED = (
    "import sys, time\n"
    "import metacore.core.trainer as t\n"
    "step = t.Trainer._train_step\n"
    "def slow(self):\n    time.sleep(0.02)\n    step(self)\n"
    "t.Trainer._train_step = slow\n"
    "from metacore.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _start_throttled(tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, "-c", THROTTLED, *RUN], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_and_kill(tmp_path: Path, after_checkpoints: int = 2) -> str:
    """Start a run in the background, SIGKILL it once its first child has written checkpoints; the parent id."""
    proc = _start_throttled(tmp_path)
    ckpt_root = tmp_path / "mlflow_runs" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        files = list(ckpt_root.glob("*/step-*.pt")) if ckpt_root.exists() else []
        if len(files) >= after_checkpoints:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(_store(tmp_path))
    exp = client.get_experiment_by_name("digits")
    parents = client.search_runs([exp.experiment_id], "tags.`metacore.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "RUNNING"
    return parents[0].info.run_id


def _metric_steps(tmp_path: Path, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(_store(tmp_path)).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    res = run_cli(*RUN, cwd=tmp)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _finals(summary):
    return [(r["role"], r["final"], r["hparams_final"]) for r in summary["runs"]]


def test_sigkill_then_resume_gives_identical_metrics(tmp_path, uninterrupted):
    parent = _start_and_kill(tmp_path)
    res = run_cli("run", "--resume", parent, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    resumed = json.loads(res.stdout)
    assert resumed["parent_run_id"] == parent
    assert _finals(resumed) == _finals(uninterrupted)
    for run in resumed["runs"]:  # same MLflow runs, no duplicated or missing steps
        steps = _metric_steps(tmp_path, run["run_id"], "train/loss")
        assert steps == list(range(5, 121, 5)), steps
    res = run_cli("run", "--resume", parent, cwd=tmp_path)
    assert res.returncode == 2 and "already finished" in res.stderr


def test_corrupted_newest_checkpoint_falls_back(tmp_path, uninterrupted):
    parent = _start_and_kill(tmp_path, after_checkpoints=3)
    newest = sorted((tmp_path / "mlflow_runs" / "checkpoints").glob("*/step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    res = run_cli("run", "--resume", parent, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "corrupted" in res.stderr and newest.name in res.stderr
    assert _finals(json.loads(res.stdout)) == _finals(uninterrupted)


def test_no_intact_checkpoint_exits_2_naming_the_directory(tmp_path):
    parent = _start_and_kill(tmp_path, after_checkpoints=1)
    for path in (tmp_path / "mlflow_runs" / "checkpoints").glob("*/step-*.pt"):
        path.write_bytes(b"garbage")
    res = run_cli("run", "--resume", parent, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "no intact checkpoint in" in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr


def test_sigint_writes_checkpoint_marks_killed_and_prints_resume(tmp_path):
    proc = _start_throttled(tmp_path)
    ckpt_root = tmp_path / "mlflow_runs" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpt_root.glob("*/step-*.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "metacore run --resume" in err and "Traceback" not in err
    parent = err.split("--resume ")[1].split()[0]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(_store(tmp_path))
    assert client.get_run(parent).info.status == "KILLED"
    res = run_cli("run", "--resume", parent, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["runs"]) == 2


def test_unknown_resume_id_exits_2(cli, tmp_path):
    run_cli("run", "--task", "digits", "--controller", "static", "--steps", "5", cwd=tmp_path)
    res = cli("run", "--resume", "0123456789abcdef")
    assert res.returncode == 2 and "no metacore parent run" in res.stderr


def test_unwritable_checkpoint_dir_exits_2(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli("run", "--task", "digits", "--controller", "static", "--steps", "5",
              "--checkpoint-dir", str(blocker / "sub"))
    assert res.returncode == 2 and "cannot write checkpoints" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_huge_learning_rate_finishes_with_finite_metrics_and_records_divergence(cli, tmp_path):
    res = cli("run", "--task", "digits", "--controller", "static", "--baseline", "none", "--preset", "smoke",
              "--set", "lr=100", "--json")
    assert res.returncode == 0, res.stderr
    run = json.loads(res.stdout)["runs"][0]
    assert run["rollbacks"] >= 1
    assert run["final"] and all(v == v and abs(v) != float("inf") for v in run["final"].values())
    assert run["hparams_final"]["lr"] < 100
    steps = _metric_steps(tmp_path, run["run_id"], "controller/rollbacks")
    assert steps


def test_two_processes_share_one_store_without_losing_metrics(tmp_path):
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "metacore", "run", "--task", "digits", "--controller", "static",
            "--baseline", "none", "--steps", "40", "--json"]
    procs = [subprocess.Popen([*args, "--seed", str(s)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        run = json.loads(out)["runs"][0]
        assert _metric_steps(tmp_path, run["run_id"], "train/loss") == list(range(10, 41, 10))


def test_plugin_raising_on_import_is_named_and_cli_keeps_working(cli, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "broken-plugin", "broken_plugin_mod", "raise RuntimeError('kaboom')\n")
    res = cli("list", "--json", env={"PYTHONPATH": with_path(site)})
    assert res.returncode == 0
    assert "broken-plugin" in res.stderr and "kaboom" in res.stderr
    assert any(t["name"] == "digits" for t in json.loads(res.stdout)["tasks"])
