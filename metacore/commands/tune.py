"""``metacore tune``: Ray Tune's PBT, PB2 or ASHA over the Trainer, logged to MLflow in metacore's layout."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

NAME = "tune"


def add_parser(sub: Any) -> None:
    from metacore.commands import flags

    t = sub.add_parser(NAME, help="population-based training (Ray Tune PBT / PB2) or ASHA over the same Trainer")
    flags.add(t, [flags.TASK.but(help="a registered task", required=True)])
    t.add_argument("--scheduler", default="pbt", help="pbt, pb2 or asha (default pbt)")
    t.add_argument("--population", type=int, default=4, help="trials (PBT/PB2 members; ASHA's initial samples)")
    t.add_argument("--interval", type=int, help="perturbation interval in optimizer steps, a multiple of the "
                   "preset's logging interval (default: about a tenth of the budget)")
    t.add_argument("--hparams", default="lr", help="comma-separated hyperparameters to tune (default lr)")
    t.add_argument("--range", action="append", metavar="NAME=LOW,HIGH", dest="ranges",
                   help="narrow a hyperparameter's range (default: the task's declared bounds)")
    flags.add(t, [flags.PRESET, flags.STEPS.but(help="budget of each trial in optimizer steps (overrides the preset)",
                                                group=None),
                  flags.SEED.but(help="seed of every trial: same data order and initial weights (default %(default)s)"),
                  flags.SET.but(help="fixed hyperparameter or task option for every trial (repeatable)"),
                  flags.ADDRESS, flags.CPUS.but(name="--cpus-per-trial", help="CPUs Ray reserves per trial, also its "
                                                "torch threads (default %(default)s)"),
                  flags.GPUS.but(name="--gpus-per-trial", help="GPUs Ray reserves per trial (default %(default)s)")])
    t.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints Tune keeps per trial (>= 2)")
    t.add_argument("--storage-path", help="Tune's checkpoints and results (default mlflow_runs/tune; shared "
                   "storage on a multi-node cluster)")
    flags.add(t, [flags.DATA_DIR, flags.TRACKING_URI, flags.EXPERIMENT, flags.DEVICE, flags.JSON])


def _ranges(items: list[str] | None) -> dict[str, tuple[str, str]]:
    from metacore.core.errors import UsageError

    out = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not name.strip() or len(parts) != 2 or not all(parts):
            raise UsageError(f"--range expects NAME=LOW,HIGH, got {item!r}")
        out[name.strip()] = (parts[0], parts[1])
    return out


def main(args: argparse.Namespace) -> int:
    from metacore.app.ray_runtime import check_address, require_ray
    from metacore.app.tune import TuneRequest, plan_tune, run_tune
    from metacore.commands.common import report_failures
    from metacore.core.options import parse_assignments
    from metacore.core.registry import load_registry

    report_failures(load_registry().failures)
    req = TuneRequest(
        task=args.task, scheduler=args.scheduler, population=args.population, interval=args.interval,
        hparams=[h.strip() for h in args.hparams.split(",") if h.strip()], ranges=_ranges(args.ranges),
        preset=args.preset, steps=args.steps, seed=args.seed, sets=parse_assignments(args.sets, "--set"),
        data_dir=args.data_dir, tracking_uri=args.tracking_uri, experiment=args.experiment, device=args.device,
        address=args.address, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        keep_checkpoints=args.keep_checkpoints, storage_path=args.storage_path)
    plan = plan_tune(req)
    require_ray("metacore tune")
    if req.address:
        check_address(req.address)
    out = run_tune(plan, quiet=args.json)
    if args.json:
        print(json.dumps(out))
    else:
        win = out["winner"]
        print(f"{out['scheduler']} x{out['population']} on {out['task']} ({out['budget_steps']} steps, compute "
              f"multiple {out['compute_multiple']:g}): winner {win['trial'] if win else 'none'}"
              + (f", {out['metric']} {win['score']:.4f}, " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in
                                                                     win["final"].items()) if win else ""))
        print(f"MLflow: experiment {out['experiment']}, tune parent run {out['parent_run_id']} (the winner's "
              f"schedule: --controller replay --controller-set from={out['parent_run_id']})")
    for err in out["errors"]:
        print(f"metacore: error: trial failed: {err}", file=sys.stderr)
    return 1 if out["errors"] or not out["winner"] else 0
