"""The meta-train request (:class:`MetaTrainRequest`), PPO's fixed settings and the check of a request before any
work (:func:`validate`: bad input is a :class:`~metacore.core.errors.UsageError`, one line, exit 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacore.core.errors import UsageError

PPO_DEFAULTS = {"learning_rate": 3e-4, "gamma": 0.95, "gae_lambda": 0.9, "n_epochs": 10, "clip_range": 0.2,
                "ent_coef": 0.0, "hidden": [64, 64]}


@dataclass
class MetaTrainRequest:
    tasks: list[str]
    hold_out: str | None
    timesteps: int
    out: str
    preset: str = "smoke"
    eval_preset: str | None = None  # default: same as preset
    interval: int | None = None
    horizon: int = 10
    seed: int = 0
    eval_seeds: int = 3
    eval_controllers: list[str] = field(default_factory=lambda: ["static", "hypergrad"])
    data_dir: str | None = None
    tracking_uri: str | None = None
    experiment: str = "meta-train"
    name: str = "policy"
    command: str = ""
    lr_spread: float = 10.0
    teacher: str | None = None  # a residual policy over this controller (autolr, ...); None: none
    teacher_options: dict[str, Any] = field(default_factory=dict)
    bc_episodes: int = 0  # teacher-driven warm-start episodes per training task before PPO
    reward: str = "delta"  # "delta": score change per decision; "final": the run's score gain at its end;
    # "teacher": the final score minus the teacher's own run's on the same seed and start
    gamma: float = PPO_DEFAULTS["gamma"]
    action_std: float = 1.0  # PPO's initial exploration std of the action (SB3: 1.0)
    checkpoint_every: int = 1  # PPO updates between checkpoints (0: none)

    def as_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def validate(req: MetaTrainRequest) -> None:
    from metacore.core.registry import load_registry

    registry = load_registry()
    if not req.tasks:
        raise UsageError("--tasks needs at least one task")
    if len(set(req.tasks)) != len(req.tasks):
        raise UsageError(f"--tasks lists a task twice: {','.join(req.tasks)}")
    for name in req.tasks + ([req.hold_out] if req.hold_out else []):
        task = registry.task(name).obj()
        task.preset(req.preset)
        if req.eval_preset:
            task.preset(req.eval_preset)
        if "lr" not in task.hparam_space():
            raise UsageError(f"task {name} has no 'lr' hyperparameter for the policy to control")
    if req.hold_out and req.hold_out in req.tasks:
        raise UsageError(f"--hold-out {req.hold_out} is also a training task")
    if req.timesteps < 1:
        raise UsageError(f"--timesteps must be at least 1, got {req.timesteps}")
    if req.horizon < 1:
        raise UsageError(f"--horizon must be at least 1, got {req.horizon}")
    if req.interval is not None and req.interval < 1:
        raise UsageError(f"--interval must be at least 1, got {req.interval}")
    if req.teacher:
        from metacore.controllers.ppo.residual import make_teacher

        make_teacher(req.teacher, req.teacher_options)
    if req.bc_episodes < 0:
        raise UsageError(f"--bc-episodes must be >= 0, got {req.bc_episodes}")
    from metacore.controllers.ppo.env import REWARDS

    if req.reward not in REWARDS:
        raise UsageError(f"--reward must be one of {', '.join(REWARDS)}, got {req.reward!r}")
    if req.reward == "teacher" and not req.teacher:
        raise UsageError("--reward teacher pays the gain over the teacher's own run: it needs --teacher")
    if not 0 < req.gamma <= 1:
        raise UsageError(f"--gamma must lie in (0, 1], got {req.gamma}")
    if not req.action_std > 0:
        raise UsageError(f"--action-std must be positive, got {req.action_std}")
    if req.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {req.checkpoint_every}")
    if req.eval_seeds < 0:
        raise UsageError(f"--eval-seeds must be >= 0, got {req.eval_seeds}")
    if req.data_dir and not Path(req.data_dir).is_dir():
        raise UsageError(f"data directory {req.data_dir} does not exist")
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")

