"""``--controller replay --controller-set from=RUN_ID``: a logged hparam/* trajectory played back in a fresh run."""

from __future__ import annotations

import json

import pytest


def _history(tmp_path, run_id, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow_runs' / 'mlflow.db'}")
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_replay_reproduces_a_hypergrad_runs_lr_exactly(cli, tmp_path):
    first = cli("run", "--task", "digits", "--controller", "hypergrad", "--preset", "smoke", "--baseline", "none",
                "--set", "lr=0.05", "--json")
    assert first.returncode == 0, first.stderr[-2000:]
    source = json.loads(first.stdout)["runs"][0]["run_id"]
    original = _history(tmp_path, source, "hparam/lr")
    assert len({v for _, v in original}) > 2, "hypergrad should have moved the rate (else the test proves nothing)"

    second = cli("run", "--task", "digits", "--controller", "replay", "--controller-set", f"from={source}",
                 "--preset", "smoke", "--baseline", "none", "--json")
    assert second.returncode == 0, second.stderr[-2000:]
    replayed = json.loads(second.stdout)["runs"][0]
    assert replayed["controller"] == "replay"
    assert _history(tmp_path, replayed["run_id"], "hparam/lr") == original  # same steps, bit-identical values

    # a run without hparam/* metrics (the run's parent) is bad input: one line on stderr, exit 2
    parent = json.loads(first.stdout)["parent_run_id"]
    bad = cli("run", "--task", "digits", "--controller", "replay", "--controller-set", f"from={parent}",
              "--preset", "smoke", "--baseline", "none")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "hparam/" in bad.stderr, bad.stderr


@pytest.mark.parametrize("sets, needle", [([], "from=RUN_ID"), (["from=nosuchrun"], "no run")])
def test_replay_bad_input(cli, sets, needle):
    args = [a for s in sets for a in ("--controller-set", s)]
    out = cli("run", "--task", "digits", "--controller", "replay", *args, "--preset", "smoke", "--baseline", "none")
    assert out.returncode == 2 and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_value_in_force_follows_the_next_logged_step():
    from metacore.controllers.replay import ReplayController

    ctrl = ReplayController.__new__(ReplayController)
    ctrl.trajectory = {"lr": ((5, 0.1), (10, 0.2))}
    ctrl._steps = {"lr": [5, 10]}
    assert [ctrl.value_at("lr", u) for u in (1, 5, 6, 10, 11, 50)] == [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]
