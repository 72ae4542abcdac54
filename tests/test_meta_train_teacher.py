"""Starting the policy from the rule: the residual over a teacher, the warm start, the long-horizon reward."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _lr_writes(trainer) -> list[tuple[int, float]]:
    """Record every lr the trainer puts in force, with its step."""
    seen: list[tuple[int, float]] = []
    write = trainer.driver.write

    def spy(changes):
        if "lr" in changes:
            seen.append((trainer.step, float(changes["lr"])))
        return write(changes)

    trainer.driver.write = spy
    return seen


def _teacher_run(env, info):
    """The teacher alone on the episode's very run (same task, seed, initial rate, budget, data)."""
    from metacore.core.registry import load_registry
    from metacore.core.trainer import Trainer

    task = env.tasks[info["task"]]
    hparams = {**task.hparam_space().defaults(), "lr": info["lr0"]}
    trainer = Trainer(task, load_registry().controller("autolr").obj(), env.trainer.ctx, hparams,
                      env.trainer.config, data=env._data[info["task"]])
    seen = _lr_writes(trainer)
    trainer.run()
    return seen


def test_residual_env_with_zero_actions_is_the_teacher_step_for_step():
    from metacore.controllers.ppo.env import HyperparamControlEnv
    from metacore.controllers.ppo.residual import TEACHER_FEATURE

    env = HyperparamControlEnv(task="digits", preset="smoke", interval=5, horizon=8, seed=0, teacher="autolr")
    assert env.features[-1] == TEACHER_FEATURE and env.observation_space.shape == (13,)
    obs, info = env.reset()
    seen = _lr_writes(env.trainer)
    done = False
    while not done:
        obs, _, done, _, _ = env.step([0.0])
        assert obs[-1] == 0.0  # the residual stays 0
    assert len(seen) > 10 and seen == _teacher_run(env, info)  # autolr changes the rate in its search and decay


def test_residual_action_scales_the_teachers_rate():
    from metacore.controllers.ppo.env import HyperparamControlEnv

    env = HyperparamControlEnv(task="digits", preset="smoke", interval=5, horizon=8, seed=0, teacher="autolr")
    _, info = env.reset()
    seen = _lr_writes(env.trainer)
    obs, *_ = env.step([1.0])  # residual += ln 2 from step 0 on
    teacher = dict(_teacher_run(env, info))
    for step, lr in seen:
        spec = env.tasks["digits"].hparam_space()["lr"]
        assert lr == pytest.approx(spec.clip(teacher[step] * 2.0), rel=1e-12)
    assert obs[-1] == pytest.approx(math.log(2.0))


def test_final_reward_pays_the_runs_score_gain_once():
    from metacore.controllers.ppo.env import HyperparamControlEnv

    env = HyperparamControlEnv(task="digits", preset="smoke", interval=10, horizon=4, seed=1, reward="final",
                               lr_spread=1.0)
    env.reset()
    rewards, done, info = [], False, {}
    while not done:
        _, r, done, _, info = env.step([0.0])
        rewards.append(r)
    assert rewards[:-1] == [0.0] * 3 and rewards[-1] == pytest.approx(info["score"], abs=1e-9)


def _episode(env, action: float):
    env.reset()
    rewards, done, info = [], False, {}
    while not done:
        _, r, done, _, info = env.step([action])
        rewards.append(r)
    return rewards, info


def test_teacher_reward_is_the_final_score_over_the_teachers_own_run():
    from metacore.controllers.ppo.env import HyperparamControlEnv

    def make(reward):
        return HyperparamControlEnv(task="digits", preset="smoke", interval=25, horizon=4, seed=1, reward=reward,
                                    teacher="autolr")

    teacher_gain = _episode(make("final"), 0.0)[0][-1]  # the teacher's own run, its whole score gain
    env = make("teacher")
    rewards, info = _episode(env, 0.0)
    assert rewards == [0.0] * 4  # residual 0: the episode is the teacher's run, to the last digit
    assert info["teacher_steps"] == 100 and teacher_gain > 0.5
    assert info["teacher_score"] == pytest.approx(env.score0 + teacher_gain, abs=1e-9)
    for action in (1.0, -1.0):  # a rate doubled (halved) at each decision
        final, _ = _episode(make("final"), action)
        rewards, info = _episode(make("teacher"), action)
        assert rewards[:-1] == final[:-1]  # rollbacks cost the same; nothing else is paid before the end
        assert rewards[-1] == pytest.approx(final[-1] - teacher_gain, abs=1e-9) and rewards[-1] != final[-1]


def test_teacher_reward_counts_the_teachers_runs_and_keeps_the_advantages_sign(tmp_path):
    from metacore.app.meta_train import MetaTrainRequest, meta_train
    from metacore.core.registry import load_registry
    from metacore.core.tracking import MemoryTracker

    req = MetaTrainRequest(tasks=["digits"], hold_out=None, timesteps=8, out=str(tmp_path), horizon=4, interval=25,
                           eval_seeds=0, teacher="autolr", reward="teacher", action_std=0.3, checkpoint_every=0,
                           lr_spread=1.0)
    training = meta_train(req, tracker=MemoryTracker(), progress=False)["training"]
    assert training["inner_steps"] == 2 * 8 * 25  # two episodes of 100 steps, each with the teacher's own run
    steps = load_registry().task("digits").obj().preset("smoke").steps  # run-equivalents count the teacher's runs too
    assert training["run_equivalents"] == pytest.approx(round(2 * 8 * 25 / steps, 2))
    assert training["ppo"]["normalize_advantage"] is False


def test_teacher_reward_needs_a_teacher():
    from metacore.app.meta_train import MetaTrainRequest, validate
    from metacore.controllers.ppo.env import HyperparamControlEnv
    from metacore.core.errors import UsageError

    with pytest.raises(UsageError, match="needs a teacher"):
        HyperparamControlEnv(task="digits", preset="smoke", reward="teacher")
    with pytest.raises(UsageError, match="needs --teacher"):
        validate(MetaTrainRequest(tasks=["digits"], hold_out=None, timesteps=4, out="x", reward="teacher"))


def _policy_at_start(tmp_path, name: str, bc_episodes: int):
    """Meta-train briefly; the policy as it was before PPO's first update (checkpoint 0) as a policy file."""
    from metacore.app import meta_checkpoint
    from metacore.app.meta_train import MetaTrainRequest, meta_train
    from metacore.controllers.ppo.policy import save_policy
    from metacore.core.tracking import MemoryTracker

    out = tmp_path / name
    req = MetaTrainRequest(tasks=["digits"], hold_out=None, timesteps=4, out=str(out), horizon=4, interval=5,
                           eval_seeds=0, teacher="autolr", bc_episodes=bc_episodes, action_std=0.3,
                           checkpoint_every=1000)
    spec = meta_train(req, tracker=MemoryTracker(), progress=False)
    _, state = meta_checkpoint.load(out / "checkpoint" / "ckpt-000000.json")
    sd = state["policy"]
    actor = {"0.weight": sd["mlp_extractor.policy_net.0.weight"], "0.bias": sd["mlp_extractor.policy_net.0.bias"],
             "2.weight": sd["mlp_extractor.policy_net.2.weight"], "2.bias": sd["mlp_extractor.policy_net.2.bias"],
             "4.weight": sd["action_net.weight"], "4.bias": sd["action_net.bias"]}
    spec = {k: v for k, v in spec.items() if k != "policy_file"}
    spec["observation"] = {**spec["observation"], "mean": [float(x) for x in state["obs_rms"]["mean"]],
                           "var": [float(x) for x in state["obs_rms"]["var"]]}
    json_path, _ = save_policy(out / "start", actor, spec)
    return json_path, spec


def _ppo_lrs(policy_json, steps=40, lr=0.02, seed=3):
    from metacore.controllers.ppo.plugin import PPOController
    from metacore.core.registry import load_registry
    from metacore.core.task import TaskContext
    from metacore.core.trainer import Trainer, TrainerConfig

    task = load_registry().task("digits").obj()
    preset = task.preset("smoke")
    hparams = {**task.hparam_space().defaults(), "lr": lr}
    ctx = TaskContext(preset, task.resolve_options(preset, {}), seed, "cpu", None, dict(hparams))
    data = task.load_data(ctx)
    out = {}
    for name, ctrl in (("ppo", PPOController(policy=str(policy_json))),
                       ("autolr", load_registry().controller("autolr").obj())):
        trainer = Trainer(task, ctrl, ctx, hparams, TrainerConfig(budget=steps, log_interval=5, eval_interval=10),
                          data=data)
        seen = _lr_writes(trainer)
        trainer.run()
        out[name] = seen
    return out


def test_warm_started_policy_reproduces_the_teacher_and_without_it_does_not(tmp_path):
    """After ``--bc-episodes`` the residual policy *is* autolr (every lr of the run within 1e-12 relative, i.e.
    exactly); SB3's initial policy (no warm start) is not (it drifts by more than 0.1 % somewhere)."""
    policy, spec = _policy_at_start(tmp_path, "bc", bc_episodes=1)
    assert spec["teacher"] == {"name": "autolr", "options": {}}
    bc = spec["training"]["bc"]
    assert bc["episodes"] == 1 and bc["inner_steps_per_task"] == {"digits": 20}
    assert bc["value_loss_after"] < bc["value_loss_before"]  # the critic learned the teacher's returns
    assert spec["training"]["run_equivalents"] == pytest.approx((20 + 20) / 40)  # warm start counted in the cost
    runs = _ppo_lrs(policy)
    assert len(runs["ppo"]) == len(runs["autolr"]) > 10
    for (s1, a), (s2, b) in zip(runs["ppo"], runs["autolr"], strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-12)

    policy0, spec0 = _policy_at_start(tmp_path, "nobc", bc_episodes=0)
    assert spec0["training"]["bc"] is None
    runs0 = _ppo_lrs(policy0)
    worst = max(abs(math.log(a / b)) for (_, a), (_, b) in zip(runs0["ppo"], runs0["autolr"], strict=False))
    assert worst > 1e-3


def test_residual_policy_file_names_its_teacher_and_rejects_a_bad_one(tmp_path):
    from metacore.controllers.ppo.plugin import PPOController
    from metacore.core.errors import ControllerError

    policy, _ = _policy_at_start(tmp_path, "bc", bc_episodes=1)
    spec = json.loads(policy.read_text())
    assert spec["observation"]["features"][-1] == "log_lr_vs_teacher"
    spec["teacher"]["name"] = "no-such-controller"
    policy.write_text(json.dumps(spec))
    with pytest.raises(ControllerError, match="teacher"):
        PPOController(policy=str(policy))
