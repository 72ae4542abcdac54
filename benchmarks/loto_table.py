"""A meta-trained policy on a task it never saw: ``ppo`` against ``static`` and against the rule it corrects.

Reads the finished runs of one task back from an MLflow store (the walk of ``lr_robustness.py``), and prints per
initial rate ``ppo``, the reference controller (``autolr`` by default: the rule the residual policy is trained over,
and the default adaptive controller) and ``static`` at the task's default rate (the run a user makes without
metacore), each as mean ± sample std over seeds and seed by seed, with the paired difference of ``ppo`` against each
(same seed; "better" follows the metric's direction) and its wins/losses/ties. The verdicts are the policy issue's:
at the default rate ``ppo`` beats ``static`` (mean paired Δ better, at least 2 of 3 seeds) and is at least as good as
the reference (mean); from every other start it is at least as good as the reference.

Optionally a figure (``--plot``): the learned ``lr`` trajectories from the default rate, ``ppo`` beside the reference
and ``hypergrad`` (``--trajectories``), the validation metric above them (mean over the seeds found, band from the
lowest to the highest seed).

    python benchmarks/loto_table.py --task cifar10 --experiments loto-cifar10,cifar10-autolr3,cifar10-robust \\
        --reference-from cifar10-autolr3 --json loto-cifar10.json --plot docs/img/loto-lr-cifar10.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def better_than(a: float, b: float, direction: str) -> int:
    """1 when ``a`` is better than ``b``, -1 when worse, 0 when equal."""
    if a == b:
        return 0
    return 1 if (a > b) == (direction == "max") else -1


def compare(mine: dict[int, float], ref: dict[int, float], direction: str) -> dict:
    """Paired difference ``mine - ref`` over the seeds both have, with wins/losses/ties of ``mine``."""
    seeds = sorted(set(mine) & set(ref))
    deltas = {s: mine[s] - ref[s] for s in seeds}
    signs = [better_than(mine[s], ref[s], direction) for s in seeds]
    mean = statistics.fmean(deltas.values()) if deltas else math.nan
    return {"seeds": seeds, "delta": mean, "delta_by_seed": deltas, "wins": signs.count(1),
            "losses": signs.count(-1), "ties": signs.count(0),
            "better": bool(deltas) and better_than(mean, 0.0, direction) == 1,
            "at_least": bool(deltas) and better_than(mean, 0.0, direction) >= 0}


def values(table: dict, method: str, lr0: float) -> dict[int, float]:
    return {seed: v[0] for seed, v in table.get(method, {}).get(lr0, {}).items()}


def stats(cell: dict[int, float]) -> dict:
    xs = [cell[s] for s in sorted(cell)]
    return {"mean": statistics.fmean(xs) if xs else math.nan, "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs), "by_seed": {s: cell[s] for s in sorted(cell)}}


def summarise(table: dict, default_lr: float, direction: str, policy: str = "ppo", reference: str = "autolr") -> dict:
    """Per initial rate of the policy's runs: the three methods and the two paired comparisons, with verdicts."""
    static = values(table, "static", default_lr)
    rows = []
    for lr0 in sorted(table.get(policy, {})):
        mine, ref = values(table, policy, lr0), values(table, reference, lr0)
        row = {"lr0": lr0, "default": math.isclose(lr0, default_lr), policy: stats(mine), reference: stats(ref),
               "static": stats(static), "vs_static": compare(mine, static, direction),
               "vs_reference": compare(mine, ref, direction),
               "diverged": sum(v[2] for v in table[policy][lr0].values())}
        vs = row["vs_static"]
        row["beats_static"] = vs["better"] and vs["wins"] >= 2 and vs["wins"] > vs["losses"]
        row["at_least_reference"] = row["vs_reference"]["at_least"]
        rows.append(row)
    return {"policy": policy, "reference": reference, "default_lr": default_lr, "direction": direction, "rows": rows}


def _cell(s: dict) -> str:
    if not s["n"]:
        return "–"
    return f"{s['mean']:.4f} ± {s['std']:.4f} ({', '.join(f'{v:.4f}' for v in s['by_seed'].values())})"


def _delta(c: dict) -> str:
    if not c["seeds"]:
        return "–"
    per = ", ".join(f"{d:+.4f}" for d in c["delta_by_seed"].values())
    return f"{c['delta']:+.4f} ({per}) {c['wins']}/{c['losses']}/{c['ties']}"


def markdown(summary: dict, metric: str) -> str:
    p, r = summary["policy"], summary["reference"]
    lines = [f"{metric}, mean ± sample std (per seed); Δ paired by seed, W/L/T of {p}; static at the default rate "
             f"{summary['default_lr']:g}", "",
             f"| initial lr | {p} | {r} | static | {p} − static | {p} − {r} | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary["rows"]:
        verdict = (f"≥ {r}" if row["at_least_reference"] else f"below {r}") if row["vs_reference"]["seeds"] else \
            f"no {r} runs"
        if row["default"]:
            verdict = ("beats static" if row["beats_static"] else "does not beat static") + ", " + verdict
        static = _cell(row["static"]) if row["default"] else "–"
        vs_static = _delta(row["vs_static"]) if row["default"] else "–"
        lines.append(f"| {row['lr0']:g}{' (default)' if row['default'] else ''} | {_cell(row[p])} | {_cell(row[r])} "
                     f"| {static} | {vs_static} | {_delta(row['vs_reference'])} | {verdict} |")
    return "\n".join(lines)


def plot_trajectories(uri: str, runs: list, metric: str, title: str, path: Path) -> Path:
    """The validation metric and the ``hparam/*`` trajectories of ``runs`` (one column)."""
    from metacore.analysis.plots import Cell, load_series, plot_cells
    from metacore.core.tracking import MlflowTracker

    store = MlflowTracker(uri, create=False)
    cell = Cell(title, metric, load_series(store, runs, metric))
    return plot_cells([cell], path, title="mean over the seeds found; band: lowest to highest seed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--experiments", required=True, help="comma-separated MLflow experiments to read (a run found "
                    "in several, same method, rate and seed, is taken from the last listed)")
    ap.add_argument("--metric", help="final metric (default: the task's primary test metric)")
    ap.add_argument("--policy", default="ppo", help="the meta-trained controller (default ppo)")
    ap.add_argument("--reference", default="autolr", help="the rule it is judged against (default autolr)")
    ap.add_argument("--reference-from", help="comma-separated experiments the reference's runs are read from "
                    "(default: all of --experiments; keeps an earlier version's runs out)")
    ap.add_argument("--default-lr", type=float, help="the task's default rate (default: its hyperparameter space's)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seeds", help="comma-separated seeds to keep (default: all)")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow_runs/mlflow.db")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG of the lr trajectories from the default rate")
    ap.add_argument("--trajectories", default="ppo,autolr,hypergrad",
                    help="methods drawn in --plot (default ppo,autolr,hypergrad)")
    args = ap.parse_args(argv)
    from lr_robustness import collect, finished_runs  # noqa: PLC0415  (a sibling script: one walk of the store)

    from metacore.core.errors import UsageError
    from metacore.core.registry import load_registry

    try:
        task = load_registry().task(args.task).obj()
    except (KeyError, UsageError) as exc:
        print(f"loto_table: {exc}", file=sys.stderr)
        return 2
    metric = args.metric or f"test/{task.primary_metric}"
    direction = task.metrics.get(metric.split("/", 1)[-1], task.direction)
    default_lr = args.default_lr or float(task.hparam_space().defaults()["lr"])
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    experiments = [e for e in args.experiments.split(",") if e]
    try:
        table = collect(args.tracking_uri, experiments, args.task, metric, args.preset, seeds, args.reference,
                        [e for e in args.reference_from.split(",") if e] if args.reference_from else None)
    except UsageError as exc:  # an experiment that is not in the store: one line, exit 2
        print(f"loto_table: {exc}", file=sys.stderr)
        return 2
    if args.policy not in table:
        print(f"loto_table: no finished {args.policy} runs of {args.task} at preset {args.preset} in "
              f"{args.experiments}", file=sys.stderr)
        return 2
    summary = summarise(table, default_lr, direction, args.policy, args.reference)
    summary.update({"task": args.task, "metric": metric, "preset": args.preset, "experiments": experiments})
    print(markdown(summary, metric))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    if args.plot:
        keep = [m for m in args.trajectories.split(",") if m]
        ref_from = set(args.reference_from.split(",")) if args.reference_from else None
        latest = {(method, run.seed): run  # as in the table: a seed found in several experiments, the last listed
                  for exp, method, lr0, run, _ in finished_runs(args.tracking_uri, experiments, args.task, seeds)
                  if method in keep and math.isclose(lr0, default_lr) and run.params.get("preset") == args.preset
                  and not (method == args.reference and ref_from is not None and exp not in ref_from)}
        runs = list(latest.values())
        runs.sort(key=lambda r: (keep.index(r.controller) if r.controller in keep else len(keep), r.seed or 0))
        val = "val/" + metric.split("/", 1)[-1]
        plot_trajectories(args.tracking_uri, runs, val, f"{args.task} ({args.preset}), never seen by the policy: "
                          f"from lr {default_lr:g}", args.plot)
        print(f"figure: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
