"""Group logged runs into comparison rows: per task, condition and controller, statistics over seeds and the
paired difference against the baseline run of the same seed.

A *condition* is what must match for two runs to be comparable (task, preset, budget, initial hyperparameters, task
options); a bench grid point is one condition. Within a (condition, controller, role) group each seed counts once:
where a seed was run several times (the same command repeated), the newest finished run is used.
A controller run is paired with the baseline run of its own ``metacore run`` (same parent, same seed) or, failing
that (a bench runs the baseline once per condition), with a baseline run of the same condition and seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metacore.analysis.stats import paired_delta, summarize
from metacore.core.store import RunRecord, Tracker

LOWER_IS_BETTER = ("loss", "mae", "rmse", "mse", "error", "perplexity")


@dataclass
class Group:
    task: str
    controller: str
    role: str
    config: tuple
    runs: list[RunRecord] = field(default_factory=list)  # one per seed, sorted by seed

    @property
    def condition(self) -> tuple:
        return self.config


@dataclass
class TaskInfo:
    primary_metric: str
    direction: str  # "max" | "min"


def task_info(task: str, runs: list[RunRecord], metric: str | None = None) -> TaskInfo:
    """Primary metric and direction from the registered task; for a task that is not installed here, guessed from
    the logged metric names (``val/accuracy`` first, names like loss/MAE/RMSE count as lower-is-better)."""
    primary, metrics = None, {}
    try:
        from metacore.core.registry import load_registry

        entry = load_registry().tasks.get(task)
        if entry is not None:
            primary, metrics = entry.obj.primary_metric, dict(entry.obj.metrics)
    except Exception:  # a broken plugin set must not stop the reading of logged runs
        pass
    if metric:
        primary = metric
    if primary is None:
        names = sorted({k[4:] for r in runs for k in r.metrics if k.startswith("val/")})
        primary = "accuracy" if "accuracy" in names else (names[0] if names else "accuracy")
    direction = metrics.get(primary) or ("min" if any(s in primary.lower() for s in LOWER_IS_BETTER) else "max")
    return TaskInfo(primary, direction)


def group_runs(runs: list[RunRecord]) -> tuple[list[Group], int]:
    """Finished training runs grouped by (task, controller, role, condition), newest run per seed; and the number
    of training runs left out because they did not finish (failed, killed, still running)."""
    groups: dict[tuple, Group] = {}
    skipped = 0
    for r in sorted(runs, key=lambda r: r.start_ms):
        if not r.is_training:
            continue
        if r.status != "FINISHED":
            skipped += 1
            continue
        key = (r.task, r.controller, r.role, r.config_key())
        group = groups.setdefault(key, Group(r.task, r.controller, r.role, r.config_key()))
        group.runs = [x for x in group.runs if x.seed != r.seed] + [r]  # newest wins
    for g in groups.values():
        g.runs.sort(key=lambda r: (r.seed is None, r.seed))
    return list(groups.values()), skipped


def find_baseline(run: RunRecord, baselines: list[RunRecord]) -> RunRecord | None:
    same_parent = [b for b in baselines if b.parent_id == run.parent_id and b.seed == run.seed]
    if same_parent:
        return same_parent[-1]
    same_condition = [b for b in baselines if b.config_key() == run.config_key() and b.seed == run.seed]
    return same_condition[-1] if same_condition else None


def condition_labels(groups: list[Group]) -> dict[tuple, str]:
    """Short labels of conditions: only what differs between the conditions of one task (``lr=0.1``)."""
    by_task: dict[str, set[tuple]] = {}
    for g in groups:
        by_task.setdefault(g.task, set()).add(g.config)
    labels: dict[tuple, str] = {}
    for conds in by_task.values():
        dicts = {c: _condition_dict(c) for c in conds}
        keys = sorted({k for d in dicts.values() for k in d})
        varying = [k for k in keys if _varies(k, list(dicts.values()))]
        for c, d in dicts.items():
            labels[c] = ", ".join(f"{k}={_short(d.get(k))}" for k in varying) or "default"
    return labels


def _varies(key: str, dicts: list[dict[str, str]]) -> bool:
    """Whether a condition key tells conditions apart. Where conditions differ by optimizer, another key counts only
    if it differs between conditions of the same optimizer (each optimizer brings its own hyperparameters and
    options: they follow from the choice and would only clutter the label)."""
    if key == "optimizer" or len({d.get("optimizer") for d in dicts}) == 1 and not key.startswith("optimizer."):
        return len({d.get(key) for d in dicts}) > 1
    by_optimizer: dict[str | None, set] = {}
    for d in dicts:
        by_optimizer.setdefault(d.get("optimizer"), set()).add(d.get(key))
    return any(len(values) > 1 for values in by_optimizer.values())


def _condition_dict(config: tuple) -> dict[str, str]:
    _task, preset, budget, items = config
    out = {"preset": preset, "steps": budget}
    for k, v in items:
        out[k.split(".", 1)[1] if k.startswith(("hparam.", "option.")) else k] = v
    return out


def _short(value: str | None) -> str:
    if value is None:
        return "-"
    try:
        f = float(value)
        return f"{f:g}"
    except ValueError:
        return value


def _best(store: Tracker, run: RunRecord, key: str, direction: str) -> float | None:
    values = [v for _, v in store.history(run.run_id, key)]
    if not values or run.diverged:
        return None
    return max(values) if direction == "max" else min(values)


def _value(run: RunRecord, key: str) -> float | None:
    return None if run.diverged else run.metrics.get(key)


def compare(store: Tracker, runs: list[RunRecord], experiment: str, *, split: str = "test",
            metric: str | None = None) -> dict[str, Any]:
    """The comparison of ``metacore compare --json``: one row per (task, condition, controller, role)."""
    groups, skipped = group_runs(runs)
    labels = condition_labels(groups)
    infos = {t: task_info(t, [r for g in groups if g.task == t for r in g.runs], metric)
             for t in sorted({g.task for g in groups})}
    rows = []
    for g in sorted(groups, key=lambda g: (g.task, labels[g.config], g.role != "controller", g.controller)):
        info = infos[g.task]
        key = f"{split}/{info.primary_metric}"
        finals = [_value(r, key) for r in g.runs]
        stat = summarize(finals)
        best = summarize([_best(store, r, f"val/{info.primary_metric}", info.direction) for r in g.runs])
        row: dict[str, Any] = {
            "task": g.task, "controller": g.controller, "role": g.role, "condition": labels[g.config],
            "config": _condition_dict(g.config), "metric": key, "direction": info.direction,
            "n": stat.n, "seeds": [r.seed for r in g.runs], "mean": stat.mean, "std": stat.std, "ci95": stat.ci95,
            "min": stat.min, "max": stat.max, "best": {"metric": f"val/{info.primary_metric}", **best.to_dict()},
            "delta_vs_baseline": None, "baseline": None, "wins": None, "losses": None, "ties": None,
            "diverged": sum(r.diverged for r in g.runs),
            "wall_s": summarize([r.wall_s for r in g.runs]).mean,
            "run_ids": [r.run_id for r in g.runs],
        }
        if g.role == "controller":
            baselines = [r for h in groups if h.task == g.task and h.role == "baseline" for r in h.runs]
            pairs = [(r, find_baseline(r, baselines)) for r in g.runs]
            pairs = [(r, b) for r, b in pairs if b is not None]
            if pairs:
                delta = paired_delta([_value(r, key) for r, _ in pairs], [_value(b, key) for _, b in pairs],
                                     info.direction)
                row.update(delta_vs_baseline=delta.to_dict(), wins=delta.wins, losses=delta.losses,
                           ties=delta.ties, baseline=sorted({b.controller for _, b in pairs})[0])
        rows.append(row)
    metrics = sorted({i.primary_metric for i in infos.values()})
    primary = metrics[0] if len(metrics) == 1 else ",".join(f"{t}:{i.primary_metric}" for t, i in infos.items())
    return {"experiment": experiment, "primary_metric": primary, "split": split, "rows": rows,
            "skipped_runs": skipped}
