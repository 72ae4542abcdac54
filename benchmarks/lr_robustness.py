"""Robustness to the initial learning rate: one adaptive run against the search a user would run instead.

Reads finished runs back from an MLflow store (the runs of ``metacore bench``/``metacore run``, any experiments),
groups them by method (the controller, or ``<optimizer>`` for a static run on a non-default optimizer) and initial
learning rate, and prints, per initial rate, each method's mean ± sample std over seeds, the best condition of the
search (``static`` and ``cosine`` over every initial rate: the best mean), and the adaptive controller's ratio to it.
Optionally writes the JSON and a figure: final metric against initial rate, one line per method.

    python benchmarks/lr_robustness.py --task cifar10 --experiments cifar10-robust,cifar10-search \\
        --controller autolr --plot docs/img/robustness-cifar10.png --json robustness-cifar10.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SEARCH = ("static", "cosine")


def finished_runs(uri: str, experiments: list[str], task: str, seeds: set[int] | None):
    """(experiment, method, lr0, run, result) of every finished training run of ``task`` with an initial rate and a
    final result in the experiments; ``seeds`` keeps only those seeds. One walk of the store for every table."""
    from metacore.core.tracking import MlflowTracker

    source = MlflowTracker(uri, create=False)
    for exp in experiments:
        for run in source.experiment_runs(exp):
            if run.status != "FINISHED" or not run.is_training or (task and run.task != task):
                continue
            if seeds is not None and run.seed not in seeds:
                continue
            result = json.loads(run.tags.get("metacore.result", "{}"))
            if "final" in result and "hparam.lr" in run.params:
                yield exp, method_of(run.controller, run.params), float(run.params["hparam.lr"]), run, result


def collect(uri: str, experiments: list[str], task: str, metric: str, preset: str, seeds: set[int] | None,
            controller: str = "", controller_from: list[str] | None = None):
    """{method: {lr0: {seed: (value, compute_ratio, diverged)}}} from the finished training runs; the judged
    ``controller``'s runs only from ``controller_from`` when given (an earlier version's runs stay out). A (method,
    rate, seed) found in several experiments is taken from the one listed last in ``experiments`` (a rerun of some
    seeds, in an experiment of its own, replaces them)."""
    table: dict[str, dict[float, dict[int, tuple]]] = defaultdict(lambda: defaultdict(dict))
    for exp, method, lr0, run, result in finished_runs(uri, experiments, task, seeds):
        if run.params.get("preset") != preset:
            continue
        if controller_from is not None and method == controller and exp not in controller_from:
            continue
        value = result["final"].get(metric)
        if value is None:
            continue
        table[method][lr0][run.seed] = (
            float(value), float(result.get("compute_ratio", 1.0)), bool(result.get("diverged", False)))
    return table


def method_of(controller: str, params: dict) -> str:
    """The controller, or ``<optimizer>`` for a static run on an optimizer other than the task's own (logged as
    ``optimizer=default``), or ``<controller>+<optimizer>``."""
    optimizer = params.get("optimizer", "")
    if not optimizer or optimizer in ("default", params.get("optimizer.default")):
        return controller
    return optimizer if controller == "static" else f"{controller}+{optimizer}"


def summarise(table, controller: str, direction: str) -> dict:
    better = max if direction == "max" else min

    def stats(cell):
        values = [v[0] for v in cell.values()]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.fmean(values), "std": std, "n": len(values), "seeds": sorted(cell),
                "compute_ratio": max(v[1] for v in cell.values()), "diverged": sum(v[2] for v in cell.values())}

    methods = {m: {lr: stats(cell) for lr, cell in sorted(by_lr.items())} for m, by_lr in sorted(table.items())}
    search = [(m, lr, s["mean"]) for m in SEARCH for lr, s in methods.get(m, {}).items()]
    best = better(search, key=lambda t: t[2]) if search else None
    rows = []
    for lr, s in methods.get(controller, {}).items():
        ratio = s["mean"] / best[2] if best else math.nan
        ok = (ratio >= 0.98) if direction == "max" else (ratio <= 1.02)
        ref = table[best[0]][best[1]] if best else {}
        mine = table[controller][lr]
        paired = {seed: mine[seed][0] - ref[seed][0] for seed in sorted(ref) if seed in mine}
        rows.append({"lr0": lr, **s, "ratio_to_best_search": ratio, "meets_goal": bool(ok and not s["diverged"]),
                     "paired_delta": statistics.fmean(paired.values()) if paired else math.nan,
                     "paired_delta_by_seed": paired})
    return {"methods": methods, "best_search": {"method": best[0], "lr0": best[1], "mean": best[2]} if best else None,
            "controller": controller, "rows": rows, "search_runs": sum(s["n"] for m in SEARCH
                                                                       for s in methods.get(m, {}).values())}


def markdown(summary: dict, metric: str) -> str:
    methods = summary["methods"]
    names = [summary["controller"]] + [m for m in methods if m != summary["controller"]]
    lrs = sorted({lr for m in methods.values() for lr in m})
    head = "| initial lr | " + " | ".join(names) + " | best of search | ratio | paired Δ (per seed) |"
    lines = [head, "| " + " | ".join(["---"] * (len(names) + 4)) + " |"]
    best = summary["best_search"]
    by_lr = {r["lr0"]: r for r in summary["rows"]}
    for lr in lrs:
        cells = []
        for m in names:
            s = methods.get(m, {}).get(lr)
            cells.append(f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})" if s else "–")
        r = by_lr.get(lr)
        ratio = f"{r['ratio_to_best_search']:.3f}{'' if r['meets_goal'] else ' ✗'}" if r else "–"
        best_cell = f"{best['mean']:.4f} ({best['method']} {best['lr0']:g})" if best else "–"
        delta = (f"{r['paired_delta']:+.4f} (" + ", ".join(f"{v:+.3f}" for v in r["paired_delta_by_seed"].values())
                 + ")") if r and r["paired_delta_by_seed"] else "–"
        lines.append(f"| {lr:g} | " + " | ".join(cells) + f" | {best_cell} | {ratio} | {delta} |")
    return f"{metric}, mean ± sample std over seeds\n\n" + "\n".join(lines)


def plot(summary: dict, metric: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, by_lr in summary["methods"].items():
        lrs = sorted(by_lr)
        means = [by_lr[lr]["mean"] for lr in lrs]
        stds = [by_lr[lr]["std"] for lr in lrs]
        style = {"lw": 2.5, "marker": "o"} if method == summary["controller"] else {"lw": 1.2, "marker": "."}
        ax.errorbar(lrs, means, yerr=stds, label=method, capsize=3, **style)
    if summary["best_search"]:
        ax.axhline(summary["best_search"]["mean"], color="grey", ls="--", lw=1,
                   label=f"best of search ({summary['best_search']['method']} {summary['best_search']['lr0']:g})")
    ax.set_xscale("log")
    ax.set_xlabel("initial learning rate")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--experiments", required=True, help="comma-separated MLflow experiments to read (a run found "
                    "in several, same method, rate and seed, is taken from the last listed)")
    ap.add_argument("--metric", help="final metric (default: the task's primary test metric)")
    ap.add_argument("--controller", default="autolr", help="the adaptive controller to judge (default autolr)")
    ap.add_argument("--controller-from", help="comma-separated experiments the judged controller's runs are read "
                    "from (default: all of --experiments)")
    ap.add_argument("--others", help="comma-separated other methods to show beside the controller and the search "
                    "(e.g. learning-rate-free optimizers: dog,mechanic-sgd); default: every method found")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seeds", help="comma-separated seeds to keep (default: all)")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow_runs/mlflow.db")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from metacore.core.registry import load_registry

    task = load_registry().task(args.task).obj()
    metric = args.metric or f"test/{task.primary_metric}"
    direction = task.metrics.get(metric.split("/", 1)[-1], task.direction)
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    from metacore.core.errors import UsageError

    try:
        table = collect(args.tracking_uri, [e for e in args.experiments.split(",") if e], args.task, metric,
                        args.preset, seeds, args.controller,
                        [e for e in args.controller_from.split(",") if e] if args.controller_from else None)
    except UsageError as exc:  # an experiment that is not in the store: one line, exit 2
        print(f"lr_robustness: {exc}", file=sys.stderr)
        return 2
    if args.others is not None:
        keep = {args.controller, *SEARCH, *(m for m in args.others.split(",") if m)}
        table = {m: cell for m, cell in table.items() if m in keep}
    if not table:
        print(f"no finished {args.task} runs at preset {args.preset} in {args.experiments}", file=sys.stderr)
        return 2
    summary = summarise(table, args.controller, direction)
    summary.update({"task": args.task, "metric": metric, "direction": direction, "preset": args.preset})
    print(markdown(summary, metric))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    if args.plot:
        plot(summary, metric, f"{args.task} ({args.preset}): final {metric} against the initial rate", args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
