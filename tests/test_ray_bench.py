"""``metacore bench --backend ray``: smoke units on a local Ray instance against a real ``mlflow server`` (the one
Ray test of the default run), a worker killed mid-unit (slow), and bad input without starting Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free loopback port, stopped (by its pid) at the end."""
    import urllib.request

    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                             str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not start: " + (tmp_path / "mlflow-server.log").read_text()[-2000:])
            time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _tree(client, experiment: str, bench_id: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    below = {}
    for r in runs:
        below.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    return below


def test_local_ray_bench_of_smoke_units_lands_in_a_tracking_server(cli, tmp_path, mlflow_server):
    pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient

    report = tmp_path / "report.md"
    out = cli("bench", "--task", "digits", "--controllers", "hypergrad,static", "--seeds", "2", "--preset", "smoke",
              "--backend", "ray", "--tracking-uri", mlflow_server, "--report", str(report), "--json", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["failures"] == [] and summary["tracking_uri"] == mlflow_server
    assert sorted((r["controller"], r["seed"]) for r in summary["runs"]) == [
        ("hypergrad", 0), ("hypergrad", 1), ("static", 0), ("static", 1)]
    below = _tree(MlflowClient(mlflow_server), "digits", summary["parent_run_id"])
    units = below[summary["parent_run_id"]]
    assert sorted(u.data.tags["metacore.unit"] for u in units) == ["0", "1"]
    children = [c for u in units for c in below.get(u.info.run_id, [])]
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {c.info.run_id for c in children} == {r["run_id"] for r in summary["runs"]}
    text = report.read_text()
    assert "hypergrad" in text and "static" in text and summary["rows"]


def test_bad_input_without_starting_ray(cli):
    pytest.importorskip("ray")
    port = _free_port()
    for args, needle in [(["--address", f"127.0.0.1:{port}"], "cannot reach the Ray cluster"),
                         (["--address", "nohostport"], "HOST:PORT"),
                         (["--cpus-per-unit", "0"], "--cpus-per-unit")]:
        out = cli("bench", "--task", "digits", "--controllers", "static", "--seeds", "1", "--preset", "smoke",
                  "--backend", "ray", *args)
        assert out.returncode == 2 and needle in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = cli("bench", "--task", "digits", "--controllers", "static", "--preset", "smoke", "--address", "x:1")
    assert out.returncode == 2 and "--backend ray" in out.stderr


def test_without_ray_the_commands_say_how_to_install_it(cli, tmp_path):
    fake = tmp_path / "no-ray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", ""), str(Path.cwd())])}
    for args in (["bench", "--task", "digits", "--controllers", "static", "--preset", "smoke", "--backend", "ray"],
                 ["tune", "--task", "digits", "--preset", "smoke"]):
        out = cli(*args, env=env)
        assert out.returncode == 2 and 'pip install "metacore[ray]"' in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def _descendants(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_a_worker_killed_mid_unit_is_retried_without_a_duplicate_child(tmp_path):
    """The unit's worker is SIGKILLed after its first checkpoint; Ray retries the task, which continues the same
    MLflow runs from the checkpoint: one child per role, every logged step once, the full budget."""
    pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow_runs' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "metacore", "bench", "--task", "digits", "--controllers", "static",
                             "--baseline", "none", "--seeds", "1", "--preset", "small", "--steps", "3000",
                             "--backend", "ray", "--json"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 600
    ckpts = tmp_path / "mlflow_runs" / "checkpoints"
    while killed is None and time.time() < deadline and proc.poll() is None:
        if any(ckpts.glob("*/step-*.pt")):
            workers = [p for p in _descendants(proc.pid) if _cmdline(p).startswith("ray::_ray_unit")]
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=900)
    assert killed is not None, "the unit finished before it could be killed: " + stderr[-2000:]
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["failures"] == [] and len(summary["runs"]) == 1 and summary["runs"][0]["steps"] == 3000
    client = MlflowClient(uri)
    below = _tree(client, "digits", summary["parent_run_id"])
    units = below[summary["parent_run_id"]]
    assert len(units) == 1 and units[0].data.tags["metacore.attempt"] == "2"
    children = below[units[0].info.run_id]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 3000
    assert sorted(steps) == list(range(10, 3001, 10))


@pytest.mark.slow
def test_ray_and_local_backends_give_the_same_results(cli, tmp_path):
    pytest.importorskip("ray")
    args = ["bench", "--task", "digits", "--controllers", "cosine,static", "--seeds", "1", "--grid", "lr=1e-2,1e-1",
            "--preset", "smoke", "--json"]
    ray_out = cli(*args, "--backend", "ray", "--experiment", "ray", timeout=900)
    local = cli(*args, "--workers", "2", "--experiment", "local", timeout=900)
    assert ray_out.returncode == 0 and local.returncode == 0, ray_out.stderr[-2000:] + local.stderr[-2000:]

    def finals(out):
        return sorted((json.dumps(r["grid"]), r["controller"], r["seed"], json.dumps(r["final"], sort_keys=True))
                      for r in json.loads(out.stdout)["runs"])

    assert finals(ray_out) == finals(local)
