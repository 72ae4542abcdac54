"""The new policy on the held-out task, against the other controllers, through ``metacore run``'s own runner: same
seeds, preset and budget for each; the result is the ``evaluation`` of the policy JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metacore.app.meta_request import MetaTrainRequest


def evaluate_held_out(req: MetaTrainRequest, policy_json: Path, tracker: Any) -> dict[str, Any]:
    """The new policy on the held-out task vs the other controllers, same seeds and budget (``metacore run``)."""
    from metacore.app.runner import RunRequest, execute, plan_run
    from metacore.core.registry import load_registry

    registry = load_registry()
    preset = req.eval_preset or req.preset
    controllers = [("ppo", {"policy": str(policy_json)})]
    controllers += [(c, {}) for c in req.eval_controllers if c in registry.controllers and c != "ppo"]
    runs: dict[str, list[dict[str, Any]]] = {}
    primary = registry.task(req.hold_out).obj().primary_metric
    for name, sets in controllers:
        plan = plan_run(RunRequest(task=req.hold_out, controller=name, baseline=None, preset=preset, seed=0,
                                   seeds=req.eval_seeds, controller_sets=sets, data_dir=req.data_dir,
                                   tracking_uri=req.tracking_uri), registry)
        summary = execute(plan, tracker=tracker)
        runs[name] = summary["runs"]
    out: dict[str, Any] = {"task": req.hold_out, "preset": preset, "seeds": req.eval_seeds, "metric": primary,
                           "controllers": {}}
    for name, rs in runs.items():
        out["controllers"][name] = _stats(rs, primary)
    return out


def _stats(runs: list[dict[str, Any]], primary: str) -> dict[str, Any]:
    def col(key: str) -> list[float]:
        return [r["final"].get(key, math.nan) for r in runs]

    from metacore.analysis.stats import summarize

    res: dict[str, Any] = {"diverged": sum(bool(r["diverged"]) for r in runs)}
    for split in ("val", "test"):
        vals = col(f"{split}/{primary}")
        stat = summarize(vals)  # mean and sample std over the finite values, as in every other table
        if stat.n:
            res[f"{split}_mean"] = stat.mean
            res[f"{split}_std"] = stat.std if stat.std is not None else 0.0  # one seed: no spread
        res[f"{split}_per_seed"] = vals
    res["wall_s"] = round(sum(r["wall_s"] for r in runs), 1)
    return res
