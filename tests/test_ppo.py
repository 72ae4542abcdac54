"""The PPO meta-policy: environment checkers, features, policy file format, the ``ppo`` controller, ``meta-train``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from metacore.controllers.ppo import ENV_ID
from metacore.controllers.ppo.features import FEATURES


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than contending for the few cores (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env(**kw):
    from metacore.controllers.ppo.env import HyperparamControlEnv

    kw = {"task": "digits", "preset": "smoke", "interval": 2, "horizon": 3, "seed": 0, **kw}
    return HyperparamControlEnv(**kw)


# ------------------------------------------------------------------------------------------------ environment
def test_env_passes_gymnasium_and_sb3_checkers():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(_env(interval=1, horizon=2), skip_render_check=True)
    sb3_check_env(_env(interval=1, horizon=2), warn=True)


def test_env_registered_on_import_in_either_order():
    for code in (
        "import metacore.controllers.ppo, sys; assert 'gymnasium' not in sys.modules\n"
        f"import gymnasium; print(gymnasium.spec({ENV_ID!r}).entry_point)",
        f"import gymnasium, metacore.controllers.ppo; print(gymnasium.spec({ENV_ID!r}).entry_point)",
    ):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "metacore.controllers.ppo.env:HyperparamControlEnv"


def test_gym_make_runs_an_episode_whose_rewards_sum_to_the_score_gain():
    import gymnasium as gym

    env = gym.make(ENV_ID, task="digits", preset="smoke", interval=3, horizon=4, seed=1)
    obs, info = env.reset(seed=5)
    assert obs.shape == (len(FEATURES),) and info["task"] == "digits"
    total, steps, done = 0.0, 0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample() * 0 + 0.5)
        total += reward
        steps += 1
        done = terminated or truncated
    assert steps == 4 and info["step"] == 12 and not info["diverged"]
    assert math.isclose(total, info["score"], abs_tol=1e-9)  # reward telescopes to the run's score gain
    lr0 = info["lr0"]
    assert math.isclose(info["lr"], lr0 * 2 ** (0.5 * 4), rel_tol=1e-6)  # four decisions of factor 2**0.5
    assert -5 <= obs.min() and obs.max() <= 5


def test_env_reset_is_deterministic_and_draws_around_the_default():
    env = _env(lr_spread=10.0)
    a, ia = env.reset(seed=3)
    b, ib = env.reset(seed=3)
    assert (a == b).all() and ia == ib
    lrs = {env.reset(seed=s)[1]["lr0"] for s in range(8)}
    assert len(lrs) == 8 and all(1e-3 <= lr <= 1e-1 for lr in lrs)


def test_env_rejects_bad_arguments():
    from metacore.core.errors import UsageError

    with pytest.raises(UsageError, match="unknown task"):
        _env(task="nope")
    with pytest.raises(UsageError, match="horizon"):
        _env(horizon=0)
    with pytest.raises(UsageError, match="no hyperparameter"):
        _env(hparams=("nope",))


# ------------------------------------------------------------------------------------------------ features
def test_gradient_statistics_cosine_and_norms():
    import torch

    from metacore.controllers.ppo.features import GradStats

    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    stats = GradStats()
    stats.observe(g)
    stats.observe([t.clone() for t in g])
    stats.observe([-t for t in g])
    out = stats.take()
    assert out["n"] == 3 and math.isclose(out["norm_mean"], 5.0, rel_tol=1e-6)
    assert math.isclose(out["cos"], 0.0, abs_tol=1e-6)  # +1 then -1
    assert math.isclose(out["norm_cv"], 0.0, abs_tol=1e-3)
    assert stats.take()["n"] == 0  # a new interval


def test_features_are_scale_free_and_bounded():
    from metacore.controllers.ppo.features import FeatureTracker, score
    from metacore.core.state import TrainingState

    def state(scale, val_hist, lr):
        return TrainingState(step=50, epoch=1.0, budget=100, train_loss=2.0 * scale,
                             train_losses=(4.0 * scale, 3.0 * scale, 2.0 * scale), val_metrics={},
                             hparams={"lr": lr}, primary_metric="m", direction="min", val_history=val_hist)

    a = FeatureTracker(0.1, 0.1).features(state(1.0, (4.0, 2.0), 0.2))
    b = FeatureTracker(1e-4, 1e-4).features(state(1000.0, (4000.0, 2000.0), 2e-4))
    assert a == pytest.approx(b) and len(a) == len(FEATURES)
    assert a[FEATURES.index("val_trend")] == pytest.approx(math.log(2))
    assert a[FEATURES.index("log_lr_vs_start")] == pytest.approx(math.log(2))
    assert score(0.9, "max") == pytest.approx(-math.log(0.1))
    huge = FeatureTracker(1e-9, 1e-9).features(state(1.0, (), 1.0))
    assert max(abs(x) for x in huge) <= 5.0


# ------------------------------------------------------------------------------------------------ policy file
def _random_policy(tmp_path, seed=0, name="policy"):
    import torch

    from metacore.controllers.ppo.policy import build_actor, save_policy

    torch.manual_seed(seed)
    actor = build_actor(len(FEATURES), 1, [16, 16], "tanh")
    spec = {"observation": {"features": list(FEATURES), "mean": [0.1] * len(FEATURES),
                            "var": [2.0] * len(FEATURES), "clip": 10.0, "epsilon": 1e-8},
            "action": {"hparams": ["lr"], "max_log_step": math.log(2)},
            "network": {"hidden": [16, 16], "activation": "tanh"}, "decisions": {"horizon": 5},
            "training": {"command": "test"}}
    json_path, weights = save_policy(tmp_path, actor.state_dict(), spec, name=name)
    return actor, json_path, weights


def test_policy_round_trip(tmp_path):
    import torch

    from metacore.controllers.ppo.policy import load_policy

    actor, json_path, weights = _random_policy(tmp_path)
    for ref in (json_path, weights, tmp_path, str(json_path.with_suffix(""))):
        policy = load_policy(ref)
        x = [0.3 * i - 1 for i in range(len(FEATURES))]
        expected = actor(((torch.tensor(x) - 0.1) / math.sqrt(2.0 + 1e-8)).clamp(-10, 10)).clamp(-1, 1).tolist()
        assert policy.act(x) == pytest.approx(expected, abs=1e-6)
        assert policy.horizon == 5 and policy.hparams == ["lr"]
    assert weights.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_tampered_or_mismatched_policy_is_a_clear_error(tmp_path):
    from metacore.controllers.ppo.policy import PolicyError, load_policy
    from metacore.core.checkpoint import sha256_file

    _, json_path, weights = _random_policy(tmp_path / "a")
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PolicyError, match="checksum"):
        load_policy(json_path)

    # weights of another policy, checksum re-signed: the policy id betrays it
    _, json_b, weights_b = _random_policy(tmp_path / "b", seed=1)
    _, json_c, weights_c = _random_policy(tmp_path / "c", seed=2)
    weights_b.write_bytes(weights_c.read_bytes())
    spec = json.loads(json_b.read_text())
    spec["weights_sha256"] = sha256_file(weights_b)
    json_b.write_text(json.dumps(spec))
    with pytest.raises(PolicyError, match="another policy"):
        load_policy(json_b)

    # JSON edits: other features, another layer size, broken JSON, missing file
    _, json_d, _ = _random_policy(tmp_path / "d", seed=3)
    good = json.loads(json_d.read_text())
    for edit, message in (
        (lambda s: s["observation"].__setitem__("features", list(FEATURES)[::-1]), "observation features"),
        (lambda s: s["network"].__setitem__("hidden", [16, 32]), "do not match the declared network"),
        (lambda s: s["observation"].__setitem__("mean", [math.nan] * len(FEATURES)), "finite"),
        (lambda s: s.__setitem__("format_version", 99), "format version"),
    ):
        spec = json.loads(json.dumps(good))
        edit(spec)
        json_d.write_text(json.dumps(spec).replace("NaN", "NaN"))
        with pytest.raises(PolicyError, match=message):
            load_policy(json_d)
    json_d.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(json_d)
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nowhere.json")


def test_actor_matches_stable_baselines3_deterministic_prediction():
    import numpy as np
    import torch
    import torch.nn as nn
    from stable_baselines3 import PPO

    from metacore.app.meta_train import extract_actor
    from metacore.controllers.ppo.policy import build_actor

    model = PPO("MlpPolicy", _env(), n_steps=8, batch_size=8, seed=0, device="cpu",
                policy_kwargs={"net_arch": {"pi": [8, 8], "vf": [8, 8]}, "activation_fn": nn.Tanh})
    with torch.no_grad():
        for p in model.policy.action_net.parameters():
            p.add_(torch.randn_like(p))  # make actions non-trivial
    rebuilt = build_actor(len(FEATURES), 1, [8, 8], "tanh")
    rebuilt.load_state_dict(extract_actor(model.policy).state_dict())
    obs = np.random.default_rng(0).uniform(-5, 5, size=(16, len(FEATURES))).astype(np.float32)
    expected, _ = model.predict(obs, deterministic=True)
    with torch.no_grad():
        got = rebuilt(torch.from_numpy(obs)).clamp(-1, 1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ controller
def _run_ppo(policy, steps=24, seed=0):
    from metacore.app.runner import RunRequest, run
    from metacore.core.tracking import MemoryTracker

    tracker = MemoryTracker()
    summary = run(RunRequest(task="digits", controller="ppo", baseline="static", preset="smoke", steps=steps,
                             seed=seed, controller_sets={"policy": str(policy)}), tracker=tracker)
    ctrl = next(r for r in summary["runs"] if r["role"] == "controller")
    return summary, tracker, tracker.history(ctrl["run_id"], "hparam/lr")


def test_ppo_controller_is_deterministic_and_changes_lr(tmp_path):
    _, json_path, _ = _random_policy(tmp_path)
    s1, tracker, lr1 = _run_ppo(json_path)
    s2, _, lr2 = _run_ppo(json_path)
    assert lr1 == lr2 and len(lr1) >= 2
    r1 = [(r["final"], r["hparams_final"]) for r in s1["runs"]]
    r2 = [(r["final"], r["hparams_final"]) for r in s2["runs"]]
    assert r1 == r2
    ctrl, base = s1["runs"]
    assert ctrl["controller"] == "ppo" and base["controller"] == "static"
    assert ctrl["hparams_final"]["lr"] != pytest.approx(0.01)  # the policy acted
    assert base["hparams_final"]["lr"] == pytest.approx(0.01)
    decisions = tracker.history(ctrl["run_id"], "controller/decisions")
    assert decisions and decisions[-1][1] == 6  # budget 24 / horizon 5 -> every 4 steps: steps 0, 4, ..., 20


def test_ppo_controller_bad_policy_fails_before_any_run(cli, tmp_path):
    res = cli("run", "--task", "digits", "--controller", "ppo", "--preset", "smoke",
              "--controller-set", f"policy={tmp_path / 'missing.json'}")
    assert res.returncode == 2, res.stderr
    assert "not found" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "mlflow_runs" / "mlflow.db").exists()


def test_shipped_default_policy_loads_and_records_its_provenance():
    from metacore.controllers.ppo.policy import default_policy_path, load_policy

    if not default_policy_path().exists():
        pytest.skip("no shipped policy in this checkout")
    policy = load_policy("default")
    tr = policy.spec["training"]
    assert "digits" not in tr["tasks"] and len(tr["tasks"]) >= 1
    assert tr["command"].startswith("metacore meta-train") and tr["timesteps"] > 0 and tr["wall_s"] > 0
    assert tr["inner_steps"] > 0 and tr["commit"]
    import os

    assert not any(os.path.isabs(word) for word in tr["command"].split()), tr["command"]  # no machine's paths
    assert not (tr.get("data_dir") and os.path.isabs(tr["data_dir"])), tr["data_dir"]
    features = policy.spec["observation"]["features"]
    assert features[: len(FEATURES)] == list(FEATURES)  # the features this version computes (+ the residual's)
    out = policy.act([0.0] * len(features))
    assert len(out) == 1 and -1 <= out[0] <= 1


@pytest.mark.slow
def test_run_digits_with_the_shipped_policy(cli):
    res = cli("run", "--task", "digits", "--controller", "ppo", "--steps", "300", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    ctrl = next(r for r in summary["runs"] if r["role"] == "controller")
    assert ctrl["controller"] == "ppo" and ctrl["steps"] == 300 and "test/accuracy" in ctrl["final"]


# ------------------------------------------------------------------------------------------------ meta-train CLI
def test_meta_train_rejects_bad_input(cli):
    res = cli("meta-train", "--tasks", "digits", "--hold-out", "digits", "--timesteps", "10", "--out", "p")
    assert res.returncode == 2 and "also a training task" in res.stderr
    res = cli("meta-train", "--tasks", "nope", "--timesteps", "10", "--out", "p")
    assert res.returncode == 2 and "unknown task 'nope'" in res.stderr
    res = cli("meta-train", "--tasks", "digits", "--timesteps", "0", "--out", "p")
    assert res.returncode == 2 and "--timesteps must be at least 1" in res.stderr


def _meta_train(cli, tmp_path, extra):
    res = cli("meta-train", "--tasks", "digits", "--timesteps", "200", "--horizon", "4", "--interval", "2",
              *extra, "--out", "policy_out", "--json", timeout=600)
    assert res.returncode == 0, res.stderr
    spec = json.loads(res.stdout)
    assert spec["training"]["timesteps"] >= 200 and spec["training"]["tasks"] == ["digits"]
    assert spec["training"]["inner_steps"] == 2 * spec["training"]["timesteps"]
    assert spec["training"]["command"].startswith("metacore meta-train --tasks digits")
    from metacore.controllers.ppo.policy import load_policy

    policy = load_policy(tmp_path / "policy_out")
    assert policy.horizon == 4 and any(v != 0 for v in policy.spec["observation"]["mean"])
    return policy


@pytest.mark.slow  # a minute or more on a busy 2-core machine: process start, sb3, 200 decisions, PPO updates
def test_meta_train_cli_writes_a_loadable_policy_and_logs_curves(cli, tmp_path):
    _meta_train(cli, tmp_path, ["--eval-seeds", "0"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow_runs' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("meta-train").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert client.get_metric_history(run.info.run_id, "meta/return/digits")


@pytest.mark.slow
def test_meta_train_evaluates_the_held_out_task(cli, tmp_path, data_dir):
    policy = _meta_train(cli, tmp_path, ["--hold-out", "electricity", "--eval-seeds", "1", "--compare", "static",
                                         "--data-dir", str(data_dir)])
    ev = policy.spec["evaluation"]
    assert ev["task"] == "electricity" and set(ev["controllers"]) == {"ppo", "static"}
    assert all(math.isfinite(c["test_mean"]) for c in ev["controllers"].values())
