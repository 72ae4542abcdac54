"""The warm start of a residual policy from its teacher, before PPO (``bc_episodes``).

With a teacher the policy is a residual over that controller (:mod:`metacore.controllers.ppo.residual`).
``bc_episodes`` teacher-driven episodes per task (actions 0) give the warm start: the actor's output layer is fit to
the teacher's actions, which are 0 in the residual's action space at every observation, so the least-squares fit is
exact (weights and bias 0: the policy *is* the teacher); the critic is regressed on the teacher's discounted returns
and the observation normaliser has seen the teacher's runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metacore.app.meta_request import MetaTrainRequest

BC_FIT_STEPS = 300  # full-batch Adam steps of the critic's regression on the teacher's returns
BC_FIT_LR = 1e-3


def warm_start(model: Any, venv: Any, envs: list[Any], req: MetaTrainRequest) -> dict[str, Any]:
    """Roll out the teacher (actions 0) for ``req.bc_episodes`` episodes per environment through the normalising
    wrapper, then: the actor's output layer to the teacher's actions (0: exact), the critic to the discounted
    (normalised) returns. Returns what it did (transitions, inner steps per task, value loss before and after)."""
    import numpy as np
    import torch

    n_envs = venv.num_envs
    zero = np.zeros((n_envs, len(envs[0].hparam_names)), dtype=np.float32)
    raw_obs, raw_rew, dones = [], [], []
    inner: dict[str, int] = {}
    episodes = 0
    for _ in range(req.bc_episodes * req.horizon):
        raw_obs.append(venv.get_original_obs().copy())
        _, _, done, infos = venv.step(zero)
        raw_rew.append(venv.get_original_reward().copy())
        dones.append(done.copy())
        episodes += int(done.sum())
        for info in infos:
            inner[info.get("task", "?")] = inner.get(info.get("task", "?"), 0) + int(info.get("interval", 0))
    obs = np.stack(raw_obs)  # (T, n_envs, n_obs)
    rew = venv.normalize_reward(np.stack(raw_rew))  # the scale PPO's value function learns on
    done = np.stack(dones)
    returns = np.zeros_like(rew)
    valid = np.zeros_like(done)  # a transition whose episode ended inside the warm start
    acc, seen_end = np.zeros(n_envs), np.zeros(n_envs, dtype=bool)
    for t in reversed(range(len(rew))):
        seen_end |= done[t]
        acc = rew[t] + req.gamma * acc * (1.0 - done[t])
        returns[t], valid[t] = acc, seen_end
    x = torch.as_tensor(venv.normalize_obs(obs[valid]), dtype=torch.float32)
    y = torch.as_tensor(returns[valid], dtype=torch.float32)
    policy = model.policy
    with torch.no_grad():
        policy.action_net.weight.zero_()  # the teacher's action, 0, at every observation: the exact fit
        policy.action_net.bias.zero_()
    params = list(policy.mlp_extractor.value_net.parameters()) + list(policy.value_net.parameters())
    opt = torch.optim.Adam(params, lr=BC_FIT_LR)

    def value_loss() -> torch.Tensor:
        return ((policy.predict_values(x).flatten() - y) ** 2).mean()

    with torch.no_grad():
        before = float(value_loss()) if len(y) else math.nan
    for _ in range(BC_FIT_STEPS if len(y) else 0):
        opt.zero_grad()
        loss = value_loss()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(value_loss()) if len(y) else math.nan
    return {"episodes": episodes, "transitions": int(valid.sum()), "inner_steps_per_task": inner,
            "value_loss_before": before, "value_loss_after": after, "fit_steps": BC_FIT_STEPS}
