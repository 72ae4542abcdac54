"""``metacore meta-train`` bad input through the real command: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

import json

import pytest


def _one_line_error(res, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("metacore: error:"), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_task_and_teacher(cli):
    _one_line_error(cli("meta-train", "--tasks", "digits,nope", "--timesteps", "10", "--out", "p"),
                    "unknown task 'nope'")
    _one_line_error(cli("meta-train", "--tasks", "digits", "--hold-out", "nope", "--timesteps", "10", "--out", "p"),
                    "unknown task 'nope'")
    _one_line_error(cli("meta-train", "--tasks", "digits", "--timesteps", "10", "--out", "p", "--teacher", "nope"),
                    "unknown teacher 'nope'")


def test_hold_out_that_is_a_training_task(cli):
    _one_line_error(cli("meta-train", "--tasks", "digits,electricity", "--hold-out", "electricity", "--timesteps",
                        "10", "--out", "p"), "--hold-out electricity is also a training task")


def test_other_bad_values(cli):
    _one_line_error(cli("meta-train", "--tasks", "digits", "--timesteps", "10", "--out", "p", "--gamma", "1.5"),
                    "--gamma")
    _one_line_error(cli("meta-train", "--tasks", "digits", "--timesteps", "10", "--out", "p", "--bc-episodes",
                        "-1"), "--bc-episodes")
    _one_line_error(cli("meta-train", "--timesteps", "10"), "--tasks", "--out", "--resume")
    _one_line_error(cli("meta-train", "--resume", "no-such-run-or-folder"), "no-such-run-or-folder")


def _tampered_policy(tmp_path):
    import torch

    from metacore.controllers.ppo.features import FEATURES
    from metacore.controllers.ppo.policy import build_actor, save_policy

    torch.manual_seed(0)
    actor = build_actor(len(FEATURES), 1, [8], "tanh")
    spec = {"observation": {"features": list(FEATURES), "mean": [0.0] * len(FEATURES),
                            "var": [1.0] * len(FEATURES), "clip": 10.0},
            "action": {"hparams": ["lr"], "max_log_step": 0.69}, "network": {"hidden": [8], "activation": "tanh"},
            "decisions": {"horizon": 4}}
    json_path, weights = save_policy(tmp_path / "pol", actor.state_dict(), spec)
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(raw))
    return json_path


def test_policy_file_failing_its_checksum(cli, tmp_path):
    policy = _tampered_policy(tmp_path)
    _one_line_error(cli("run", "--task", "digits", "--controller", "ppo", "--controller-set", f"policy={policy}",
                        "--preset", "smoke"), "does not match the checksum")
    assert not (tmp_path / "mlflow_runs").exists() or not list((tmp_path / "mlflow_runs").rglob("meta.yaml"))


def test_checkpoint_failing_its_checksum(cli, tmp_path):
    import torch

    from metacore.app import meta_checkpoint
    from metacore.app.meta_train import MetaTrainRequest

    folder = tmp_path / "out" / "checkpoint"
    req = MetaTrainRequest(tasks=["digits"], hold_out=None, timesteps=8, out=str(tmp_path / "out"))
    meta_checkpoint.write_request(folder, {**req.as_dict(), "mlflow_run_id": "0123"})
    path = meta_checkpoint.save(folder, 1, {"policy": {"w": torch.ones(3)}})
    tensors = path.with_suffix(".safetensors")
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 1
    tensors.write_bytes(bytes(raw))
    _one_line_error(cli("meta-train", "--resume", str(tmp_path / "out")), "does not match the checksum",
                    "ckpt-000001")


@pytest.mark.slow  # three processes: start, kill, resume (about a minute on a busy 2-core machine)
def test_cli_kill_and_resume(cli, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    args = ["meta-train", "--tasks", "digits", "--timesteps", "40", "--horizon", "4", "--interval", "2",
            "--teacher", "autolr", "--bc-episodes", "1", "--eval-seeds", "0", "--json"]
    assert cli(*args, "--out", "a").returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "metacore", *args, "--out", "b"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "b" / "checkpoint").glob("ckpt-00000[3-9].json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "policy.json").exists()
    res = cli("meta-train", "--resume", "b", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["training"]["resumed"]
    a, b = load_file(str(tmp_path / "a" / "policy.safetensors")), load_file(str(tmp_path / "b" / "policy.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
