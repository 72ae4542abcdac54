"""One Ray Tune trial of ``metacore tune``: the very same Trainer as ``metacore run`` (static controller, the trial's
hyperparameters), as a Tune function trainable.

Every report ends one perturbation interval and carries a checkpoint (Tune's checkpoint API), so a scheduler never
sees a trial that has results but no checkpoint to exploit or resume from (ray#27170). On restore the weights,
optimizer state, data position and RNGs come from the checkpoint — the donor's after an exploit — and then the
trial's own (perturbed) values are written into the optimizer, since the optimizer state just loaded carries the
donor's (the "perturbed values ignored after restore" problem, ray#62173). What was in force is read back from
the optimizer and kept in the trial's lineage, which travels in the checkpoint: the schedule that produced a trial's
weights, across exploits, is therefore known at the end.

Each trial logs to its own MLflow child run below the tune parent (tag ``metacore.role`` = ``population``): the
Trainer's metrics (``hparam/<name>`` as step metrics, ``train/loss``, ``val/*``, ``test/*``) plus
``tune/weights_crc32`` at every report and ``tune/restored_crc32`` where a checkpoint was loaded.
"""

from __future__ import annotations

import json
import tempfile
import zlib
from pathlib import Path
from typing import Any

from metacore.core.store import Tracker

PAYLOAD, META = "trainer.pt", "meta.json"


def weights_crc32(model: Any) -> int:
    """A fingerprint of the model's weights (exactly representable as a logged float)."""
    crc = 0
    for name, tensor in sorted(model.state_dict().items()):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensor.detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc


def in_force(trainer: Any, names: list[str]) -> dict[str, float]:
    """The values the optimizer (or model, data) actually holds now, read back from where they act."""
    out = {}
    for name in names:
        spec = trainer.space[name]
        value = trainer.hparams[name]
        if spec.acts_on == "optimizer":
            group = trainer.optimizer.param_groups[0]
            value = group[spec.key] if spec.index is None else group[spec.key][spec.index]
        out[name] = float(value.item() if hasattr(value, "item") else value)
    return out


def trial_values(config: dict[str, Any], space: Any, names: list[str]) -> dict[str, float]:
    """The trial's hyperparameters from Tune's config, clipped into the task's bounds (integers rounded)."""
    return {name: space[name].clip(float(config[name])) for name in names}


def restore_with(trainer: Any, payload: dict[str, Any], values: dict[str, float], logged_until: int = -1) -> None:
    """Load a checkpoint (weights, optimizer, data position, RNGs), then put ``values`` in force: the optimizer
    state just loaded carries the checkpoint's own values, which must not win over the trial's perturbed ones."""
    trainer.restore({**payload, "hparams": {**payload["hparams"], **values}}, logged_until=logged_until)


def train_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune function trainable. ``spec`` holds the run request and what the driver decided (plain data)."""
    import torch
    from ray import tune

    from metacore.app.plan import budget_steps, plan_run
    from metacore.app.request import RunRequest
    from metacore.controllers.static import StaticController
    from metacore.core.task import TaskContext
    from metacore.core.tracking import MlflowTracker
    from metacore.core.trainer import Trainer, TrainerConfig

    torch.set_num_threads(spec["threads"])
    plan = plan_run(RunRequest(**spec["request"]))
    task, names, interval = plan.task, spec["names"], spec["interval"]
    values = trial_values(config, task.hparam_space(), names)
    hparams = {**plan.hparams, **values}
    ctx = TaskContext(plan.preset, dict(plan.options), plan.request.seed, plan.device, plan.data_dir, dict(hparams))
    data = task.load_data(ctx)
    budget = budget_steps(plan, data, hparams)
    trial_id = tune.get_context().get_trial_id()
    tracker = MlflowTracker(spec["tracking_uri"])
    run_id, fresh_run = _trial_run(tracker, spec, plan, trial_id, budget)
    cfg = TrainerConfig(budget=budget, log_interval=plan.preset.log_interval, eval_interval=interval,
                        precision=plan.request.precision)
    trainer = Trainer(task, StaticController(), ctx, hparams, cfg, data=data, tracker=tracker, run_id=run_id)
    lineage = [{"step": 0, "trial": trial_id, "hparams": values, "in_force": in_force(trainer, names)}]
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        if not fresh_run:  # a trial that already trained and comes back without a checkpoint would start over
            tracker.set_tags(run_id, {"metacore.restarted_without_checkpoint": "true"})
        tracker.log_metrics(run_id, {"tune/fresh_start": 1.0}, 0)
    else:
        with checkpoint.as_directory() as folder:
            payload = torch.load(Path(folder) / PAYLOAD, map_location=ctx.device, weights_only=True)
            meta = json.loads((Path(folder) / META).read_text())
        own = meta["trial"] == trial_id
        # the trial itself, resumed after a pause or a lost worker: nothing it logged is logged again
        restore_with(trainer, payload, values, tracker.last_logged_step(run_id) if own else -1)
        lineage = meta["lineage"]
        if not own or lineage[-1]["hparams"] != values:
            lineage = [*lineage, {"step": trainer.step, "trial": trial_id, "from_trial": meta["trial"],
                                  "hparams": values, "in_force": in_force(trainer, names)}]
        tracker.log_metrics(run_id, {"tune/restored_crc32": float(weights_crc32(trainer.model))}, trainer.step)
    while True:
        before = trainer.step
        trainer.advance(interval - trainer.step % interval)
        metrics: dict[str, Any] = {"step": trainer.step, "interval_steps": trainer.step - before,
                                   "diverged": trainer.diverged}
        if trainer.done:
            result = trainer.finish()
            metrics.update({_key(k): v for k, v in result.final.items()})
            metrics["score"] = result.final[f"val/{task.primary_metric}"]
        else:
            metrics["score"] = trainer.val_metrics.get(task.primary_metric, _worst(task.direction))
            metrics.update({_key(f"val/{k}"): v for k, v in trainer.val_metrics.items()})
        crc = weights_crc32(trainer.model)
        tracker.log_metrics(run_id, {"tune/weights_crc32": float(crc),
                                     "tune/interval_steps": float(trainer.step - before)}, trainer.step)
        tracker.flush(run_id)
        meta = {"trial": trial_id, "run_id": run_id, "step": trainer.step, "crc32": crc, "lineage": lineage}
        metrics["lineage"] = json.dumps(lineage)
        with tempfile.TemporaryDirectory() as folder:
            torch.save(trainer.checkpoint_payload(), Path(folder) / PAYLOAD)
            (Path(folder) / META).write_text(json.dumps(meta))
            if trainer.done:
                _finish_run(tracker, run_id, trial_id, result, lineage)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        if trainer.done:
            return


def _key(name: str) -> str:
    return name.replace("/", "_")


def _worst(direction: str) -> float:
    return float("-inf") if direction == "max" else float("inf")


def _trial_run(tracker: Tracker, spec: dict[str, Any], plan: Any, trial_id: str, budget: int) -> tuple[str, bool]:
    """The trial's MLflow child run below the tune parent: found by its trial id, or created (second value True)."""
    for child in tracker.children(spec["parent_id"]):
        if child.tags.get("metacore.trial") == trial_id:
            tracker.reopen(child.run_id)
            return child.run_id, False
    run_id = tracker.start_run(
        spec["experiment"], f"{spec['scheduler']} trial {trial_id}", parent_id=spec["parent_id"],
        tags={"metacore.role": "population", "metacore.controller": spec["scheduler"], "metacore.task": plan.task.name,
              "metacore.seed": str(plan.request.seed), "metacore.trial": trial_id},
        params={"task": plan.task.name, "preset": plan.preset.name, "scheduler": spec["scheduler"],
                "trial": trial_id, "seed": plan.request.seed, "budget_steps": budget,
                "perturbation_interval": spec["interval"], **{f"option.{k}": v for k, v in plan.options.items()}})
    return run_id, True


def _finish_run(tracker: Tracker, run_id: str, trial_id: str, result: Any, lineage: list[dict[str, Any]]) -> None:
    entry = {"run_id": run_id, "trial": trial_id, "steps": result.steps, "final": result.final,
             "hparams_final": result.hparams_final, "diverged": result.diverged, "rollbacks": result.rollbacks,
             "exploits": sum(1 for e in lineage if e.get("from_trial"))}
    tracker.log_dict(run_id, lineage, "lineage.json")
    tracker.set_tags(run_id, {"metacore.result": json.dumps(entry), "metacore.diverged": str(result.diverged).lower()})
    tracker.end_run(run_id, "FINISHED")
