"""Concurrent writers into one store, and an MLflow tracking server that stops mid-run.

Each test counts every logged step of every run against the budget and the logging interval and prints one JSON
line of figures (runs, steps, metric values counted, failures injected, lost), the figures of docs/reliability.md.
Everything listens on 127.0.0.1 only; the server is a real ``mlflow server`` process started by the test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_reliability import THROTTLED

pytestmark = pytest.mark.slow  # a real server starts in tens of seconds on a busy 2-core machine
STEPS, LOG_EVERY = 40, 5  # digits smoke: train/loss at every 5th step


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"OMP_NUM_THREADS": "1", "METACORE_THREADS": "1", **extra})
    return env


def _run_args(uri, seed=0, steps=STEPS, interval=10):
    return ["run", "--task", "digits", "--controller", "cosine", "--baseline", "none", "--preset", "smoke",
            "--steps", str(steps), "--seed", str(seed), "--checkpoint-interval", str(interval),
            "--tracking-uri", uri, "--json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on a loopback port, with its store in a folder of the test; stop() and start() again."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> None:
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        pytest.fail("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: the server and its workers
            self.proc.wait()
        self.proc = None
        self.log.close()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def _count(uri: str, run_ids: list[str]) -> tuple[int, int]:
    """(train/loss steps missing against the budget, metric values stored) over the runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    missing = values = 0
    for run_id in run_ids:
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        missing += len(set(range(LOG_EVERY, STEPS + 1, LOG_EVERY)) - set(steps))
        assert steps == sorted(set(steps)), f"a step twice in {run_id}: {steps}"
        run = client.get_run(run_id)
        values += sum(len(client.get_metric_history(run_id, k)) for k in run.data.metrics)
    return missing, values


def _eight_at_once(uri: str, cwd: Path) -> list[str]:
    procs = [subprocess.Popen([sys.executable, "-m", "metacore", *_run_args(uri, seed)], cwd=cwd, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(8)]
    outs = [p.communicate(timeout=900) for p in procs]
    run_ids = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "database is locked" not in err and "Traceback" not in err
        run_ids.append(json.loads(out)["runs"][0]["run_id"])
    return run_ids


def test_eight_writers_into_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_ids = _eight_at_once(uri, tmp_path)
    missing, values = _count(uri, run_ids)
    print(json.dumps({"store": "sqlite", "runs": 8, "steps": 8 * STEPS, "metric_values": values, "lost": missing}))
    assert missing == 0


def test_eight_writers_into_one_tracking_server(server, tmp_path):
    run_ids = _eight_at_once(server.uri, tmp_path)
    missing, values = _count(server.uri, run_ids)
    print(json.dumps({"store": "server", "runs": 8, "steps": 8 * STEPS, "metric_values": values, "lost": missing}))
    assert missing == 0


def _start_throttled(uri: str, cwd: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", THROTTLED, *_run_args(uri)], cwd=cwd, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoints(cwd: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while len(list((cwd / "mlflow_runs" / "checkpoints").glob("*/step-*.pt"))) < n:
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"run ended early: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
        time.sleep(0.05)


def test_server_stopped_mid_run_and_back_delivers_every_metric(server, tmp_path):
    proc = _start_throttled(server.uri, tmp_path, METACORE_TRACKING_WAIT="600")
    _wait_for_checkpoints(tmp_path, 1, proc)  # step 10 is in the store
    server.stop()  # failure injected: the server is gone while the run trains on
    _wait_for_checkpoints(tmp_path, 3, proc)  # steps 20 and 30 trained without a store
    server.start()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert "is not answering" in err and "answers again" in err
    run_id = json.loads(out)["runs"][0]["run_id"]
    missing, values = _count(server.uri, [run_id])
    print(json.dumps({"store": "server stopped and restarted", "runs": 1, "steps": STEPS, "metric_values": values,
                      "failures_injected": 1, "lost": missing}))
    assert missing == 0


def test_server_gone_for_good_ends_clearly_and_resume_delivers(server, tmp_path):
    proc = _start_throttled(server.uri, tmp_path, METACORE_TRACKING_WAIT="3")
    _wait_for_checkpoints(tmp_path, 1, proc)
    server.stop()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert f"the MLflow store {server.uri} did not answer for 3 s" in last and "metacore run --resume" in last
    assert "Traceback" not in err and out == ""
    parent = last.split("--resume ")[1].split()[0]
    server.start()
    res = subprocess.run([sys.executable, "-m", "metacore", "run", "--resume", parent, "--tracking-uri", server.uri,
                          "--json"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    run_id = json.loads(res.stdout)["runs"][0]["run_id"]
    missing, values = _count(server.uri, [run_id])
    print(json.dumps({"store": "server stopped, run ended, resumed", "runs": 1, "steps": STEPS,
                      "metric_values": values, "failures_injected": 1, "lost": missing}))
    assert missing == 0
