"""``metacore tune``: bad input (no Ray started), the restore that keeps a perturbed value in force, and (slow) PBT
on digits smoke with 2 members where an exploit happens, checked against the known Ray PBT pitfalls."""

from __future__ import annotations

import json
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, needle", [
    (["--population", "0"], "--population"),
    (["--scheduler", "hyperband"], "--scheduler"),
    (["--hparams", "nosuch"], "nosuch"),
    (["--range", "lr=1,0.1"], "LOW must be below HIGH"),
    (["--keep-checkpoints", "1"], "--keep-checkpoints"),
    (["--interval", "7"], "--interval"),
])
def test_bad_input_is_one_line_exit_2(cli, args, needle):
    out = cli("tune", "--task", "digits", "--preset", "smoke", *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_unreachable_address_is_one_line_exit_2(cli):
    pytest.importorskip("ray")
    out = cli("tune", "--task", "digits", "--preset", "smoke", "--address", f"127.0.0.1:{_free_port()}")
    assert out.returncode == 2 and "cannot reach the Ray cluster" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_restore_puts_the_perturbed_value_in_force_over_the_donors_optimizer_state():
    """What an exploit does: the donor's weights and optimizer state, then the recipient's perturbed lr in force
    (the optimizer state alone would bring back the donor's lr)."""
    from metacore.app.tune_trial import in_force, restore_with, weights_crc32
    from metacore.controllers.static import StaticController
    from metacore.testing import run_controller

    donor, _ = run_controller(StaticController(), steps=30, stop_after=10, hparams={"lr": 0.1})
    payload = donor.checkpoint_payload()
    recipient, _ = run_controller(StaticController(), steps=30, stop_after=4, hparams={"lr": 0.02})
    assert weights_crc32(recipient.model) != weights_crc32(donor.model)
    restore_with(recipient, payload, {"lr": 0.08})
    assert weights_crc32(recipient.model) == weights_crc32(donor.model) and recipient.step == 10
    assert in_force(recipient, ["lr"]) == {"lr": 0.08}
    assert all(g["lr"] == 0.08 for g in recipient.optimizer.param_groups)
    recipient.advance(1)
    assert recipient.optimizer.param_groups[0]["lr"] == 0.08


def test_schedule_points_follow_the_lineage():
    from metacore.app.tune import schedule_points

    lineage = [{"step": 0, "in_force": {"lr": 0.1}}, {"step": 10, "in_force": {"lr": 0.05}}]
    assert schedule_points(lineage, 22, 5) == [(5, {"lr": 0.1}), (10, {"lr": 0.1}), (15, {"lr": 0.05}),
                                               (20, {"lr": 0.05}), (22, {"lr": 0.05})]


def _histories(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_pbt_two_members_exploit_continues_from_the_donor_with_the_perturbed_value(cli, tmp_path):
    pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient

    out = cli("tune", "--task", "digits", "--preset", "smoke", "--scheduler", "pbt", "--population", "2",
              "--interval", "10", "--range", "lr=1e-3,1", "--keep-checkpoints", "2", "--json", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow_runs' / 'mlflow.db'}")
    assert summary["errors"] == [] and all(t["completed"] for t in summary["trials"])  # no lost donor checkpoint
    assert summary["compute_multiple"] == pytest.approx(2.0)
    runs = {t["trial"]: t["run_id"] for t in summary["trials"]}
    children = client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert sorted(c.info.run_id for c in children) == sorted(runs.values())
    assert all(c.data.tags["metacore.role"] == "population" and c.info.status == "FINISHED" for c in children)

    exploits = 0
    for trial, run_id in runs.items():
        # never restarted from scratch: a trial exploited (or resumed) before it had a checkpoint would start over
        assert _histories(client, run_id, "tune/fresh_start") == [(0, 1.0)]
        assert "metacore.restarted_without_checkpoint" not in client.get_run(run_id).data.tags
        own = dict(_histories(client, run_id, "tune/weights_crc32"))
        lr = dict(_histories(client, run_id, "hparam/lr"))
        for step, restored in _histories(client, run_id, "tune/restored_crc32"):
            if restored == own[step]:
                continue  # the trial's own checkpoint (resumed after a synchronous pause)
            exploits += 1
            donors = [t for t, r in runs.items() if t != trial and
                      dict(_histories(client, r, "tune/weights_crc32")).get(step) == restored]
            assert donors, f"{trial} restored weights at step {step} that no other member had"
            donor_lr = dict(_histories(client, runs[donors[0]], "hparam/lr"))[step]
            assert lr[step + 5] != donor_lr, "the perturbed value must be in force, not the donor's"
    assert exploits >= 1, "no exploit happened; the test would prove nothing"
    for t in summary["trials"]:
        mine = [e for e in t["lineage"] if e["trial"] == t["trial"]]
        assert all(e["in_force"] == e["hparams"] for e in mine), mine  # read back from the optimizer
        final_lr = _histories(client, t["run_id"], "hparam/lr")[-1][1]
        assert final_lr == t["lineage"][-1]["hparams"]["lr"]

    # the winner's schedule on the parent, replayed exactly in a fresh run
    parent = summary["parent_run_id"]
    schedule = _histories(client, parent, "hparam/lr")
    assert len({v for _, v in schedule}) >= 2
    replay = cli("run", "--task", "digits", "--preset", "smoke", "--controller", "replay", "--controller-set",
                 f"from={parent}", "--baseline", "none", "--json")
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert _histories(client, json.loads(replay.stdout)["runs"][0]["run_id"], "hparam/lr") == schedule
