"""``metacore meta-train``: train the PPO meta-policy across tasks, evaluate it on a held-out task."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from metacore.commands import flags
from metacore.commands.common import report_failures

NAME = "meta-train"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="meta-train the PPO hyperparameter policy across tasks (stable-baselines3)")
    p.add_argument("--tasks", help="comma-separated training tasks, e.g. cifar10,electricity; required unless "
                   "--resume")
    p.add_argument("--hold-out", default=None, help="task kept out of training and evaluated at the end vs static")
    p.add_argument("--timesteps", type=int, help="PPO timesteps (decisions, over all tasks); required unless --resume")
    p.add_argument("--out", help="output folder for policy.safetensors + policy.json (checkpoints in OUT/checkpoint/);"
                   " required unless --resume")
    p.add_argument("--name", default="policy", help="file stem of the policy (default policy)")
    flags.add(p, [flags.PRESET.but(default="smoke", help="task preset of the training runs (default %(default)s)")])
    p.add_argument("--eval-preset", default=None, help="preset of the held-out evaluation (default: --preset)")
    p.add_argument("--horizon", type=int, default=10, help="decisions per training run (default 10)")
    p.add_argument("--interval", type=int, default=None,
                   help="optimizer steps per decision (default: the preset's steps / horizon)")
    p.add_argument("--eval-seeds", type=int, default=3, help="seeds of the held-out evaluation (default 3; 0: skip)")
    p.add_argument("--compare", default="static,hypergrad",
                   help="controllers the held-out evaluation runs beside ppo (default static,hypergrad; "
                   "unregistered ones are skipped)")
    flags.add(p, [flags.SEED.but(help="seed of PPO and of the episode draws (default %(default)s)")])
    p.add_argument("--lr-spread", type=float, default=10.0,
                   help="initial lr drawn log-uniformly in [default/s, default*s] per episode (default 10)")
    flags.add(p, [flags.DATA_DIR, flags.TRACKING_URI.but(help="MLflow store (default sqlite:///mlflow_runs/mlflow.db)"),
                  flags.EXPERIMENT.but(default="meta-train", help="MLflow experiment of the meta-training curves")])
    p.add_argument("--teacher", default="none",
                   help="controller the policy starts from and corrects (a residual policy: lr = the teacher's lr "
                   "times exp(residual), each action moves the residual), e.g. autolr; none: the action multiplies "
                   "the lr in force (default %(default)s)")
    p.add_argument("--bc-episodes", type=int, default=0,
                   help="teacher-driven warm-start episodes per training task before PPO: the actor set to the "
                   "teacher's actions, the critic fit to its returns, the observation statistics from its runs "
                   "(default %(default)s: none)")
    p.add_argument("--reward", default="delta", choices=("delta", "final", "teacher"),
                   help="delta: the validation score's change at each decision; final: the whole run's score gain, "
                   "once, at its end; teacher: the final score minus that of the teacher's own run on the same "
                   "seed and start (one more run per episode, counted; needs --teacher; PPO's advantages are then "
                   "not normalised, so a policy whose deviations all lose moves back to the teacher) "
                   "(default %(default)s)")
    p.add_argument("--gamma", type=float, default=0.95,
                   help="PPO discount per decision; near 1 values the final score, not the next decision's "
                   "(default %(default)s)")
    p.add_argument("--action-std", type=float, default=1.0,
                   help="PPO's initial exploration std of the action in [-1, 1] (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="PPO updates between checkpoints in OUT/checkpoint/ (safetensors + JSON; default "
                   "%(default)s, 0: none)")
    flags.add(p, [flags.RESUME.but(help="continue a killed meta-train from its newest checkpoint, with its original "
                                   "options: its --out folder, its checkpoint folder or its MLflow run id",
                                   metavar="DIR_OR_RUN")])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the runs are small, more threads mostly contend)")
    flags.add(p, [flags.JSON.but(help="print the policy spec as JSON on stdout and nothing else")])


def main(args: argparse.Namespace) -> int:
    import os

    from metacore.app.meta_train import MetaTrainRequest, meta_train, validate
    from metacore.core.errors import UsageError
    from metacore.core.registry import load_registry

    report_failures(load_registry())
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.resume:
        return _resume(args)
    missing = [f for f, v in (("--tasks", args.tasks), ("--timesteps", args.timesteps), ("--out", args.out))
               if v is None]
    if missing:
        raise UsageError(f"meta-train needs {', '.join(missing)} (or --resume)")
    if args.lr_spread < 1:
        raise UsageError(f"--lr-spread must be >= 1, got {args.lr_spread}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    req = MetaTrainRequest(
        tasks=tasks, hold_out=args.hold_out, timesteps=args.timesteps, out=args.out, preset=args.preset,
        eval_preset=args.eval_preset, interval=args.interval, horizon=args.horizon, seed=args.seed,
        eval_seeds=args.eval_seeds, eval_controllers=[c.strip() for c in args.compare.split(",") if c.strip()],
        data_dir=args.data_dir or os.environ.get("METACORE_DATA_DIR"), tracking_uri=args.tracking_uri,
        experiment=args.experiment, name=args.name, lr_spread=args.lr_spread,
        teacher=None if args.teacher in ("", "none") else args.teacher, bc_episodes=args.bc_episodes,
        reward=args.reward, gamma=args.gamma, action_std=args.action_std, checkpoint_every=args.checkpoint_every,
        command="metacore " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "")
    validate(req)
    import torch

    torch.set_num_threads(args.threads)
    return _finish(args, meta_train(req, progress=not args.json))


def _resume(args: argparse.Namespace) -> int:
    """``--resume DIR_OR_RUN``: the request the run was started with, continued from its newest checkpoint."""
    import dataclasses
    from pathlib import Path

    from metacore.app import meta_checkpoint
    from metacore.app.meta_train import MetaTrainRequest, checkpoint_dir, meta_train
    from metacore.core.errors import UsageError

    target = Path(args.resume).expanduser()
    folder = None
    for candidate in (target, checkpoint_dir(target)):
        if (candidate / meta_checkpoint.REQUEST).is_file():
            folder = candidate
            break
    if folder is None:
        if target.exists():
            raise UsageError(f"--resume {args.resume}: no meta-train checkpoint there (no {meta_checkpoint.REQUEST} "
                             f"in it or in its checkpoint/ folder)")
        from metacore.core.tracking import MlflowTracker

        run = MlflowTracker(args.tracking_uri).get_run(args.resume)
        where = run.tags.get("metacore.checkpoint_dir") if run else None
        if not where:
            raise UsageError(f"--resume {args.resume}: neither a meta-train folder nor a meta-train run in the "
                             f"MLflow store")
        folder = Path(where)
    saved = meta_checkpoint.read_request(folder)
    names = {f.name for f in dataclasses.fields(MetaTrainRequest)}
    req = MetaTrainRequest(**{k: v for k, v in saved.items() if k in names})
    if args.tracking_uri:  # the store moved (or is named differently from here)
        req.tracking_uri = args.tracking_uri
    if folder.resolve() != checkpoint_dir(req.out).resolve():  # the folder moved: its out folder is its parent
        req.out = str(folder.parent)
    import torch

    torch.set_num_threads(args.threads)
    return _finish(args, meta_train(req, progress=not args.json, resume=True))


def _finish(args: argparse.Namespace, spec: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(spec))
    else:
        _print(spec)
    return 0


def _print(spec: dict[str, Any]) -> None:
    tr = spec["training"]
    print(f"policy written to {spec['policy_file']}")
    print(f"trained on {', '.join(tr['tasks'])} ({tr['preset']}): {tr['timesteps']} decisions, {tr['inner_steps']} "
          f"optimizer steps ({tr['run_equivalents']} run-equivalents), {tr['wall_s']} s")
    ev = spec.get("evaluation")
    if ev:
        print(f"held-out {ev['task']} ({ev['preset']}, {ev['seeds']} seeds), final {ev['metric']}:")
        for name, r in ev["controllers"].items():
            val = f"{r['val_mean']:.4f} ± {r['val_std']:.4f}" if "val_mean" in r else "-"
            test = f"{r['test_mean']:.4f} ± {r['test_std']:.4f}" if "test_mean" in r else "-"
            print(f"  {name:<12} val {val}   test {test}   diverged {r['diverged']}")
