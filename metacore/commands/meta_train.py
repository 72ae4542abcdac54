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
    p.add_argument("--tasks", required=True, help="comma-separated training tasks, e.g. cifar10,electricity")
    p.add_argument("--hold-out", default=None, help="task kept out of training and evaluated at the end vs static")
    p.add_argument("--timesteps", type=int, required=True, help="PPO timesteps (decisions, over all tasks)")
    p.add_argument("--out", required=True, help="output folder for policy.safetensors + policy.json")
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
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the runs are small, more threads mostly contend)")
    flags.add(p, [flags.JSON.but(help="print the policy spec as JSON on stdout and nothing else")])


def main(args: argparse.Namespace) -> int:
    import os

    from metacore.app.meta_train import MetaTrainRequest, meta_train, validate
    from metacore.core.errors import UsageError
    from metacore.core.registry import load_registry

    report_failures(load_registry())
    if args.lr_spread < 1:
        raise UsageError(f"--lr-spread must be >= 1, got {args.lr_spread}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    req = MetaTrainRequest(
        tasks=tasks, hold_out=args.hold_out, timesteps=args.timesteps, out=args.out, preset=args.preset,
        eval_preset=args.eval_preset, interval=args.interval, horizon=args.horizon, seed=args.seed,
        eval_seeds=args.eval_seeds, eval_controllers=[c.strip() for c in args.compare.split(",") if c.strip()],
        data_dir=args.data_dir or os.environ.get("METACORE_DATA_DIR"), tracking_uri=args.tracking_uri,
        experiment=args.experiment, name=args.name, lr_spread=args.lr_spread,
        command="metacore " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "")
    validate(req)
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    spec = meta_train(req, progress=not args.json)
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
