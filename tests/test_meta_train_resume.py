"""Meta-training checkpoints: pickle-free, verified, and a killed run resumes to the very same policy."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _req(out, **kw):
    from metacore.app.meta_train import MetaTrainRequest

    base = dict(tasks=["digits"], hold_out=None, timesteps=24, out=str(out), horizon=4, interval=2, eval_seeds=0,
                teacher="autolr", bc_episodes=1, action_std=0.3, gamma=0.99)
    return MetaTrainRequest(**{**base, **kw})


@pytest.mark.parametrize("reward", ["delta", "teacher"])
def test_killed_meta_train_resumes_to_the_same_policy(tmp_path, monkeypatch, reward):
    import torch
    from safetensors.torch import load_file

    from metacore.app import meta_checkpoint
    from metacore.app.meta_train import meta_train
    from metacore.core.tracking import MemoryTracker

    tracker = MemoryTracker()
    meta_train(_req(tmp_path / "a", reward=reward), tracker=tracker, progress=False)

    real_save = meta_checkpoint.save

    def killed_after_3(folder, updates, state):
        path = real_save(folder, updates, state)
        if updates == 3:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill right after the checkpoint of update 3
        return path

    monkeypatch.setattr(meta_checkpoint, "save", killed_after_3)
    from metacore.app import runner

    monkeypatch.setattr(runner, "git_commit", lambda: "commit-at-start")
    with pytest.raises(KeyboardInterrupt):
        meta_train(_req(tmp_path / "b", reward=reward), tracker=tracker, progress=False)
    monkeypatch.setattr(meta_checkpoint, "save", real_save)
    monkeypatch.setattr(runner, "git_commit", lambda: "commit-at-resume")  # the tree moved meanwhile
    assert [p.name for p in meta_checkpoint.checkpoints(tmp_path / "b" / "checkpoint")] == [
        "ckpt-000002.json", "ckpt-000003.json"]  # the newest two are kept
    assert not (tmp_path / "b" / "policy.json").exists()

    spec = meta_train(_req(tmp_path / "b", reward=reward), tracker=tracker, progress=False, resume=True)
    assert spec["training"]["resumed"] and spec["training"]["timesteps"] == 24
    assert spec["training"]["commit"] == "commit-at-start"  # the code that started it, as in its MLflow params
    assert tracker.get_run(spec["training"]["mlflow_run_id"]).params["git.commit"] == "commit-at-start"
    a, b = load_file(str(tmp_path / "a" / "policy.safetensors")), load_file(str(tmp_path / "b" / "policy.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, end_a = meta_checkpoint.latest(tmp_path / "a" / "checkpoint")
    _, end_b = meta_checkpoint.latest(tmp_path / "b" / "checkpoint")
    for part in ("policy", "optimizer"):
        flat_a, flat_b = {}, {}
        meta_checkpoint.flatten(end_a[part], flat_a)
        meta_checkpoint.flatten(end_b[part], flat_b)
        assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part
    assert (end_a["obs_rms"]["mean"] == end_b["obs_rms"]["mean"]).all() and end_a["n_updates"] == end_b["n_updates"]
    pa, pb = json.loads((tmp_path / "a" / "policy.json").read_text()), json.loads(
        (tmp_path / "b" / "policy.json").read_text())
    assert pa["observation"] == pb["observation"] and pa["training"]["inner_steps"] == pb["training"]["inner_steps"]
    assert pa["training"]["run_equivalents"] == pb["training"]["run_equivalents"]


@pytest.mark.parametrize("reward", ["delta", "teacher"])
def test_env_snapshot_in_the_middle_of_a_run_continues_exactly(reward):
    """A checkpoint between rollouts can find an environment mid-run (an episode cut short by a divergence): its
    snapshot carries the inner run's trainer checkpoint, and the restored environment goes on identically (on a run
    that does not roll back later: the trainer's in-memory rollback snapshot is taken afresh at a restore, as in
    ``metacore run --resume``)."""
    import numpy as np

    from metacore.app import meta_checkpoint
    from metacore.controllers.ppo.env import HyperparamControlEnv

    def make():
        return HyperparamControlEnv(task="digits", preset="smoke", interval=3, horizon=6, seed=4, teacher="autolr",
                                    teacher_options={"start_factor": 1.0, "decades": 0.5}, lr_spread=1.0,
                                    reward=reward)

    env = make()
    env.reset()
    env.step([0.5])
    env.step([-0.3])
    tensors: dict = {}
    body = meta_checkpoint.flatten(env.snapshot(), tensors)  # through the checkpoint encoding, as on disk
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from disk: no storage shared with the run
    snap = meta_checkpoint.unflatten(json.loads(json.dumps(body)), tensors)
    rest_a = [env.step([a]) for a in (0.2, 0.0, -1.0, 1.0)]
    assert env.trainer.rollbacks == 0
    again = make()
    if reward == "teacher":  # the teacher's run is not made again at a restore: its score travels in the snapshot
        again._teacher_score = None
    assert again.restore(snap) is None
    rest_b = [again.step([a]) for a in (0.2, 0.0, -1.0, 1.0)]
    for (oa, ra, da, _, ia), (ob, rb, db, _, ib) in zip(rest_a, rest_b, strict=True):
        assert np.array_equal(oa, ob) and ra == rb and da == db and ia == ib
    assert env.np_random.bit_generator.state == again.np_random.bit_generator.state


def test_checkpoint_round_trip_and_tampering(tmp_path):
    import numpy as np
    import torch

    from metacore.app import meta_checkpoint

    state = {"t": torch.arange(4.0), "n": np.arange(3, dtype=np.int64), "nested": {1: [1.5, None, "x"],
             "tuple": (1, 2)}, "nan": float("nan")}
    path = meta_checkpoint.save(tmp_path, 7, state)
    updates, back = meta_checkpoint.load(path)
    assert updates == 7 and torch.equal(back["t"], state["t"]) and (back["n"] == state["n"]).all()
    assert back["nested"] == {1: [1.5, None, "x"], "tuple": (1, 2)} and back["nan"] != back["nan"]
    raw = path.with_suffix(".safetensors").read_bytes()
    assert b"pickle" not in raw and not path.with_suffix(".safetensors").read_bytes().startswith(b"PK")
    path.with_suffix(".safetensors").write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(meta_checkpoint.CheckpointError, match="does not match the checksum"):
        meta_checkpoint.load(path)
