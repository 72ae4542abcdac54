"""``metacore tune``: Ray Tune's ``PopulationBasedTraining``, ``PB2`` and ``ASHAScheduler`` over the Trainer.

The hyperparameters searched and their ranges come from the task's declared space (``--hparams``, narrowed by
``--range NAME=LOW,HIGH``). One report per perturbation interval (in optimizer steps), each with a checkpoint;
PBT and PB2 run synchronously (every member reaches the interval before any is exploited), so an exploit always
finds the donor's checkpoint of that interval, and ``--keep-checkpoints`` (>= 2) then cannot delete it too early
(ray#9036). MLflow, in metacore's layout: a parent run (tag ``metacore.role`` = ``tune``) with one child per trial
(``population``, see ``tune_trial``); on the parent, the winning trial's schedule as ``hparam/<name>`` step metrics
(the lineage across its exploits, at the Trainer's logging steps) and ``schedule.json``, so
``--controller replay --controller-set from=PARENT_ID`` replays it.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metacore.app.runner import RunRequest
from metacore.core.errors import UsageError
from metacore.core.store import Tracker

SCHEDULERS = ("pbt", "pb2", "asha")
TUNE_ROOT = Path("mlflow_runs") / "tune"


@dataclass
class TuneRequest:
    task: str
    scheduler: str = "pbt"
    population: int = 4
    interval: int | None = None  # perturbation interval in steps (default: a tenth of the budget)
    hparams: list[str] = field(default_factory=lambda: ["lr"])
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    preset: str = "small"
    steps: int | None = None
    seed: int = 0
    sets: dict[str, str] = field(default_factory=dict)
    data_dir: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    device: str = "auto"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    keep_checkpoints: int = 2
    storage_path: str | None = None


@dataclass
class TunePlan:
    request: TuneRequest
    run: Any  # the runner's Plan of one trial (static controller, no baseline)
    interval: int
    budget: int
    bounds: dict[str, tuple[float, float]]


def plan_tune(req: TuneRequest) -> TunePlan:
    """Validate everything before Ray starts or anything is written."""
    from metacore.app.plan import plan_run

    if req.scheduler not in SCHEDULERS:
        raise UsageError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {req.scheduler!r}")
    if req.population < 1 or req.scheduler in ("pbt", "pb2") and req.population < 2:
        least = 1 if req.scheduler == "asha" else 2
        raise UsageError(f"--population must be at least {least} for {req.scheduler}, got {req.population}")
    if req.keep_checkpoints < 2:
        raise UsageError(f"--keep-checkpoints must be at least 2 (an exploit needs the donor's checkpoint of the "
                         f"last interval while the donor writes the next), got {req.keep_checkpoints}")
    if not req.cpus_per_trial > 0 or req.gpus_per_trial < 0:
        raise UsageError("--cpus-per-trial must be positive and --gpus-per-trial >= 0")
    if not req.hparams or len(set(req.hparams)) != len(req.hparams):
        raise UsageError("--hparams needs distinct names, e.g. lr,momentum")
    clash = sorted(set(req.hparams) & set(req.sets))
    if clash:
        raise UsageError(f"{clash[0]} is given both in --hparams and --set")
    run = plan_run(RunRequest(task=req.task, controller="static", baseline=None, preset=req.preset, steps=req.steps,
                              seed=req.seed, sets=dict(req.sets), data_dir=req.data_dir,
                              tracking_uri=req.tracking_uri, experiment=req.experiment, device=req.device))
    space = run.task.hparam_space()
    bounds = {}
    for name in req.hparams:
        if name not in space:
            raise UsageError(f"unknown hyperparameter {name!r} in --hparams for task {run.task.name} "
                             f"(known: {', '.join(space.names())})")
        spec = space[name]
        low, high = req.ranges.get(name, (spec.low, spec.high))
        low, high = spec.check(low, "--range"), spec.check(high, "--range")
        if not low < high:
            raise UsageError(f"--range {name}: LOW must be below HIGH, got {low:g},{high:g}")
        bounds[name] = (low, high)
    unknown = sorted(set(req.ranges) - set(req.hparams))
    if unknown:
        raise UsageError(f"--range {unknown[0]} is not among --hparams {','.join(req.hparams)}")
    budget = req.steps or run.preset.steps
    log_interval = run.preset.log_interval
    interval = req.interval or max(log_interval, budget // 10 // log_interval * log_interval)
    if interval < 1 or interval % log_interval or interval >= budget:
        raise UsageError(f"--interval must be a multiple of the preset's logging interval ({log_interval}) and "
                         f"below the budget ({budget} steps), got {interval}")
    return TunePlan(req, run, interval, budget, bounds)


def _search_space(plan: TunePlan) -> dict[str, Any]:
    from ray import tune

    space = plan.run.task.hparam_space()
    out = {}
    for name, (low, high) in plan.bounds.items():
        spec = space[name]
        if spec.integer:
            out[name] = (tune.lograndint if spec.log else tune.randint)(int(low), int(high) + 1)
        else:
            out[name] = (tune.loguniform if spec.log else tune.uniform)(low, high)
    return out


def _scheduler(plan: TunePlan, mode: str) -> Any:
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    req = plan.request
    common = {"time_attr": "step", "metric": "score", "mode": mode}
    if req.scheduler == "asha":
        return ASHAScheduler(**common, max_t=plan.budget, grace_period=plan.interval, reduction_factor=2)
    if req.scheduler == "pb2":
        return PB2(**common, perturbation_interval=plan.interval, synch=True,
                   hyperparam_bounds={k: list(v) for k, v in plan.bounds.items()})
    return PopulationBasedTraining(**common, perturbation_interval=plan.interval, synch=True,
                                   hyperparam_mutations=_search_space(plan))


def run_tune(plan: TunePlan, *, quiet: bool = False) -> dict[str, Any]:
    """Start (or join) Ray, run the population, log the winner; the JSON summary."""
    import sys

    import numpy as np

    from metacore import __version__
    from metacore.app.ray_runtime import absolute_tracking_uri, ray_session
    from metacore.app.runner import git_commit
    from metacore.core.tracking import MlflowTracker

    req, run = plan.request, plan.run
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    tracker = MlflowTracker(req.tracking_uri)
    uri = absolute_tracking_uri(tracker.uri)
    experiment = req.experiment or run.task.name
    mode = run.task.direction
    with ray_session(req.address, "metacore tune") as ray_mod:
        from ray import tune

        parent_id = tracker.start_run(
            experiment, f"tune {req.scheduler} x{req.population}",
            tags={"metacore.role": "tune", "metacore.task": run.task.name, "metacore.controller": req.scheduler,
                  "metacore.request": json.dumps(asdict(req))},
            params={"task": run.task.name, "preset": run.preset.name, "scheduler": req.scheduler,
                    "population": req.population, "perturbation_interval": plan.interval, "budget_steps": plan.budget,
                    "hparams": ",".join(req.hparams), "seed": req.seed, "metacore.version": __version__,
                    "git.commit": git_commit(), "ray.version": ray_mod.__version__,
                    **{f"range.{k}": f"{lo:g},{hi:g}" for k, (lo, hi) in plan.bounds.items()},
                    **{f"hparam.{k}": v for k, v in run.hparams.items() if k not in plan.bounds}})
        status = "FAILED"
        start = time.perf_counter()
        try:
            spec = {"request": {**asdict(run.request), "tracking_uri": uri,
                                "data_dir": str(Path(run.data_dir).resolve()) if run.data_dir else None},
                    "names": list(plan.bounds), "interval": plan.interval, "parent_id": parent_id,
                    "tracking_uri": uri, "experiment": experiment, "scheduler": req.scheduler,
                    "threads": max(1, int(req.cpus_per_trial))}
            random.seed(req.seed)  # PBT's explore draws from `random`, PB2's from numpy
            np.random.seed(req.seed)
            say(f"tune {parent_id}: {req.scheduler}, {req.population} trial(s), interval {plan.interval} of "
                f"{plan.budget} steps, Ray {req.address or 'local instance'}")
            results = _fit(tune, plan, spec, mode, parent_id)
            summary = _summarize(tracker, plan, results, parent_id, experiment, mode)
            summary.update(tracking_uri=tracker.uri, wall_s=round(time.perf_counter() - start, 1))
            tracker.log_dict(parent_id, summary, "summary.json")
            status = "FINISHED" if not summary["errors"] else "FAILED"
            for t in summary["trials"]:
                say(f"trial {t['trial']}: score {t['score']:.4f}, {t['steps_trained']} steps trained, "
                    f"{t['exploits']} exploit(s)")
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracker.end_run(parent_id, status)
    return summary


def _fit(tune: Any, plan: TunePlan, spec: dict[str, Any], mode: str, parent_id: str) -> Any:
    import warnings

    from ray.tune.search.basic_variant import BasicVariantGenerator

    from metacore.app.tune_trial import train_trial

    req = plan.request
    storage = Path(req.storage_path or TUNE_ROOT).resolve()
    # both answered by the design: function trainables restart in a reused actor, and synchronous PBT never needs
    # a donor's checkpoint older than the last two
    warnings.filterwarnings("ignore", message=".*reuse_actors.*")
    warnings.filterwarnings("ignore", message=".*num_to_keep <= 2.*")
    trainable = tune.with_resources(tune.with_parameters(train_trial, spec=spec),
                                    {"cpu": req.cpus_per_trial, "gpu": req.gpus_per_trial})
    tuner = tune.Tuner(
        trainable, param_space=_search_space(plan),
        tune_config=tune.TuneConfig(num_samples=req.population, scheduler=_scheduler(plan, mode), reuse_actors=True,
                                    search_alg=BasicVariantGenerator(random_state=req.seed)),
        run_config=tune.RunConfig(name=f"tune-{parent_id[:12]}", storage_path=str(storage), verbose=0,
                                  stop={"step": plan.budget},  # a finished trial is never perturbed again
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=req.keep_checkpoints),
                                  failure_config=tune.FailureConfig(max_failures=2)))
    return tuner.fit()


def _summarize(tracker: Tracker, plan: TunePlan, results: Any, parent_id: str, experiment: str,
               mode: str) -> dict[str, Any]:
    """Per-trial results, the compute multiple, the winner and its schedule (logged on the parent)."""
    req = plan.request
    trials, errors = [], []
    for res in results:
        if res.error is not None:
            errors.append(f"{type(res.error).__name__}: {str(res.error).strip().splitlines()[0][:300]}")
        metrics = res.metrics or {}
        lineage = json.loads(metrics.get("lineage", "[]"))
        trials.append({"trial": metrics.get("trial_id", ""), "score": float(metrics.get("score", math.nan)),
                       "step": int(metrics.get("step", 0)), "steps_trained": 0,
                       "completed": int(metrics.get("step", 0)) >= plan.budget,
                       "exploits": sum(1 for e in lineage if e.get("from_trial")), "hparams": lineage[-1]["hparams"]
                       if lineage else {}, "final": {k: v for k, v in metrics.items() if k.startswith("test_")},
                       "lineage": lineage})
    runs = {c.tags.get("metacore.trial"): c for c in tracker.children(parent_id)}
    for t in trials:
        child = runs.get(t["trial"])
        t["run_id"] = child.run_id if child else None
        if child:  # every interval a trial trained, across exploits and restarts, as it logged them
            t["steps_trained"] = int(sum(v for _, v in tracker.history(child.run_id, "tune/interval_steps")))
        if child and child.status == "RUNNING":  # stopped early by the scheduler (ASHA)
            tracker.set_tags(child.run_id, {"metacore.stopped_early": "true"})
            tracker.end_run(child.run_id, "KILLED")
    done = [t for t in trials if t["completed"] and math.isfinite(t["score"])]
    better = max if mode == "max" else min
    winner = better(done, key=lambda t: t["score"]) if done else None
    out: dict[str, Any] = {"parent_run_id": parent_id, "task": plan.run.task.name, "preset": plan.run.preset.name,
                           "experiment": experiment, "scheduler": req.scheduler, "population": req.population,
                           "interval": plan.interval, "budget_steps": plan.budget, "metric": "val/" +
                           plan.run.task.primary_metric, "compute_multiple": round(sum(t["steps_trained"] for t in
                                                                                       trials) / plan.budget, 3),
                           "trials": trials, "winner": None, "errors": errors}
    if winner:
        out["winner"] = {k: winner[k] for k in ("trial", "run_id", "score", "final", "lineage")}
        _log_schedule(tracker, parent_id, winner["lineage"], plan)
        if winner["run_id"]:
            tracker.set_tags(winner["run_id"], {"metacore.winner": "true"})
        tracker.set_tags(parent_id, {"metacore.winner_run_id": str(winner["run_id"])})
        tracker.log_metrics(parent_id, {"test/" + k[len("test_"):]: v for k, v in winner["final"].items()},
                            plan.budget)
    return out


def schedule_points(lineage: list[dict[str, Any]], budget: int, log_interval: int) -> list[tuple[int, dict]]:
    """The values in force for the update of each logging step: the last lineage entry set before that step."""
    points = []
    steps = list(range(log_interval, budget + 1, log_interval))
    for step in steps + ([budget] if not steps or steps[-1] != budget else []):
        entry = [e for e in lineage if e["step"] < step][-1]
        points.append((step, entry["in_force"]))
    return points


def _log_schedule(tracker: Tracker, parent_id: str, lineage: list[dict[str, Any]], plan: TunePlan) -> None:
    for step, values in schedule_points(lineage, plan.budget, plan.run.preset.log_interval):
        tracker.log_metrics(parent_id, {f"hparam/{k}": v for k, v in values.items()}, step)
    tracker.log_dict(parent_id, lineage, "schedule.json")
