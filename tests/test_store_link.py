"""A store that goes away mid-run: training goes on, metrics stay buffered and are delivered when it is back, or the
link gives up with one clear message and the checkpoint holds what was not delivered."""

import pytest

from metacore.core.errors import TrackingError
from metacore.core.store_link import StoreLink, is_transient


class Away:
    """Stands in for a client call; fails with a connection error while ``down``."""

    def __init__(self):
        self.down = False
        self.calls = []

    def __call__(self, *args, **kwargs):
        if self.down:
            raise ConnectionError("Connection refused")
        self.calls.append((args, kwargs))


def test_remote_errors_are_transient_but_refusals_are_not():
    class Refused(Exception):
        error_code = "INVALID_PARAMETER_VALUE"

    assert is_transient(ConnectionError("refused"), remote=True)
    assert not is_transient(Refused("bad"), remote=True)
    assert not is_transient(ConnectionError("refused"), remote=False)
    assert is_transient(Exception("database is locked"), remote=False)


def test_link_retries_then_gives_up_once_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setenv("METACORE_TRACKING_WAIT", "0.3")
    link = StoreLink("http://127.0.0.1:9")
    call = Away()
    call.down = True
    assert link.try_call(call, 1) is False  # buffered writes: no wait
    with pytest.raises(TrackingError, match=r"did not answer for 0.3 s \(Connection refused\)"):
        link.call(call, 2)
    with pytest.raises(TrackingError, match="did not answer"):  # at once now, no second wait
        link.call(call, 3)
    assert capsys.readouterr().err.count("is not answering") == 1


def test_tracker_buffers_while_away_and_delivers_when_back(tmp_path, monkeypatch, capsys):
    from metacore.core import tracking
    from metacore.core.tracking import MlflowTracker

    tracker = MlflowTracker(f"sqlite:///{tmp_path}/m.db")
    run_id = tracker.start_run("exp", "r")
    monkeypatch.setattr(tracking, "FLUSH_EVERY", 4)
    monkeypatch.setattr(tracking, "RETRY_EVERY_S", 0.0)
    real = tracker.client.log_batch
    state = {"down": True}

    def log_batch(*args, **kwargs):
        if state["down"] and "metrics" in kwargs:
            raise ConnectionError("Connection refused")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", log_batch)
    tracker.link.remote = True  # as if it were a server
    for step in range(1, 11):
        tracker.log_metrics(run_id, {"train/loss": 1.0 / step, "hparam/lr": 0.1}, step)
    kept = tracker.undelivered(run_id)
    assert len(kept) == 20 and kept[0][0] == "train/loss" and kept[-1][3] == 10  # all kept, in order
    state["down"] = False
    tracker.end_run(run_id)
    steps = [m.step for m in tracker.client.get_metric_history(run_id, "train/loss")]
    assert steps == list(range(1, 11))
    err = capsys.readouterr().err
    assert "is not answering" in err and "answers again" in err


def test_checkpointed_undelivered_metrics_are_redelivered(memory_tracker):
    run_id = memory_tracker.start_run("exp", "r")
    memory_tracker.redeliver(run_id, [["train/loss", 0.5, 0, 10], ["val/accuracy", 0.9, 0, 10],
                                      ["train/loss", 0.4, 0, 20]])
    assert memory_tracker.history(run_id, "train/loss") == [(10, 0.5), (20, 0.4)]
    assert memory_tracker.history(run_id, "val/accuracy") == [(10, 0.9)]
