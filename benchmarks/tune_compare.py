"""Final metric against compute multiple, one point per method: `metacore tune` (PBT, PB2, ASHA), a static grid
(`metacore bench --grid lr=...`, its best rate by validation), a single adaptive run (`metacore run`) and the
replay of the PBT winner's schedule. Reads the ``--json`` outputs of those commands (several files, comma-separated,
one per seed: the row is their mean ± sample std), or the finished runs of an MLflow store; prints a markdown table
and writes a plot.

    python benchmarks/tune_compare.py --metric mae --run hypergrad=hypergrad.json --grid static-grid=grid.json \
        --tune pbt=pbt.json --tune pb2=pb2.json --tune asha=asha.json --run replay-pbt=replay.json --plot out.png
    python benchmarks/tune_compare.py --metric accuracy --mode max --store sqlite:///mlflow_runs/mlflow.db \
        --tune pbt=pbt-0.json,pbt-1.json,pbt-2.json --store-grid static-grid=cifar10-robust:static \
        --store-run autolr=cifar10-autolr3:autolr@1e-3 --store-run sf-adamw=cifar10-optimizers:sf-adamw \
        --task cifar10 --seeds 0,1,2

``--store-run NAME=EXPERIMENTS:METHOD[@LR]`` (experiments comma-separated) is one run per seed (a method as
`lr_robustness.py` names it: the controller, the optimizer of a static run on another optimizer, or
``controller+optimizer``; ``@LR`` picks the initial rate); ``--store-grid NAME=EXPERIMENTS:METHOD`` is, per seed, the
best rate by validation over every rate of that method. The compute multiple is the optimizer steps of all runs of a
method over one run's budget.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any


def _pair(text: str) -> tuple[str, list[dict[str, Any]]]:
    name, _, paths = text.partition("=")
    return name, [json.loads(Path(path).read_text()) for path in paths.split(",")]


def _row(method: str, per_seed: list[dict[str, Any]], note: str) -> dict[str, Any]:
    """One method's row from one dict per seed (compute, val, test; in seed order): the means, and the tests' sample
    std."""
    tests = [r["test"] for r in per_seed if r["test"] is not None]
    vals = [r["val"] for r in per_seed if r["val"] is not None]
    return {"method": method, "compute": statistics.fmean(r["compute"] for r in per_seed), "seeds": len(per_seed),
            "val": statistics.fmean(vals) if vals else None, "test": statistics.fmean(tests) if tests else None,
            "test_std": statistics.stdev(tests) if len(tests) > 1 else None, "tests": tests, "note": note}


def _store_runs(uri: str, experiments: str, method: str, task: str, seeds: set[int] | None):
    """{seed: {lr0: (budget, steps, final)}} of the finished training runs of ``method`` in the experiments
    (comma-separated), in seed order."""
    from lr_robustness import finished_runs  # noqa: PLC0415  (a sibling script: one walk of the store)

    out: dict[int, dict[float, tuple]] = {}
    for _, name, lr0, run, result in finished_runs(uri, experiments.split(","), task, seeds):
        if name == method:
            steps = int(result.get("steps", 0))
            out.setdefault(run.seed, {})[lr0] = (int(run.params.get("budget_steps", steps)), steps, result["final"])
    return dict(sorted(out.items()))


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    better = min if args.mode == "min" else max
    val_key, test_key = f"val/{args.metric}", f"test/{args.metric}"
    out = []
    for name, datas in map(_pair, args.run or []):
        per = [{"compute": 1.0, "val": d["runs"][0]["final"][val_key], "test": d["runs"][0]["final"][test_key]}
               for d in datas]
        r = datas[0]["runs"][0]
        out.append(_row(name, per, f"{r['controller']}, {r['steps']} steps"))
    for name, datas in map(_pair, args.grid or []):
        per = []
        for data in datas:
            runs = data["runs"]
            budget = max(r["steps"] for r in runs)
            best = better(runs, key=lambda r: r["final"][val_key])
            per.append({"compute": sum(r["steps"] for r in runs) / budget, "val": best["final"][val_key],
                        "test": best["final"][test_key]})
        out.append(_row(name, per, f"{len(datas[0]['runs'])} rates, best by val: {best['grid']}"))
    for name, datas in map(_pair, args.tune or []):
        per = [{"compute": d["compute_multiple"], "val": d["winner"]["score"] if d["winner"] else None,
                "test": d["winner"]["final"].get(f"test_{args.metric}") if d["winner"] else None} for d in datas]
        d = datas[0]
        out.append(_row(name, per, f"{d['scheduler']}, {d['population']} trials, interval {d['interval']}"))
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    for name, spec in (item.partition("=")[::2] for item in args.store_run or []):
        experiment, _, method = spec.partition(":")
        method, _, lr = method.partition("@")
        per = []
        for by_lr in _store_runs(args.store, experiment, method, args.task, seeds).values():
            picked = [v for k, v in by_lr.items() if not lr or math.isclose(k, float(lr), rel_tol=1e-9)]
            if picked:
                budget, steps, final = picked[0]
                per.append({"compute": steps / max(1, budget), "val": final.get(val_key), "test": final.get(test_key)})
        if per:
            out.append(_row(name, per, f"{method}{' from lr ' + lr if lr else ''}, one run"))
    for name, spec in (item.partition("=")[::2] for item in args.store_grid or []):
        experiment, _, method = spec.partition(":")
        per, picks = [], []
        for by_lr in _store_runs(args.store, experiment, method, args.task, seeds).values():
            budget = max(b for b, _, _ in by_lr.values())
            lr0, (_, _, final) = better(by_lr.items(), key=lambda kv: kv[1][2].get(val_key, math.nan))
            per.append({"compute": sum(s for _, s, _ in by_lr.values()) / budget, "val": final.get(val_key),
                        "test": final.get(test_key)})
            picks.append(f"{lr0:g}")
        if per:
            out.append(_row(name, per, f"{method}, {len(by_lr)} rates, best by val: lr {'/'.join(picks)}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--metric", required=True, help="primary metric without split, e.g. mae or accuracy")
    p.add_argument("--mode", default="min", choices=("min", "max"))
    p.add_argument("--run", action="append", metavar="NAME=JSON", help="`metacore run --json` output")
    p.add_argument("--grid", action="append", metavar="NAME=JSON", help="`metacore bench --json` output")
    p.add_argument("--tune", action="append", metavar="NAME=JSON", help="`metacore tune --json` output")
    p.add_argument("--store", default=None, help="MLflow store for --store-* (default: metacore's)")
    p.add_argument("--store-run", action="append", metavar="NAME=EXPERIMENT:METHOD[@LR]",
                   help="one run per seed from the store")
    p.add_argument("--store-grid", action="append", metavar="NAME=EXPERIMENT:METHOD",
                   help="per seed, the best rate by validation of every rate of METHOD in the store")
    p.add_argument("--task", default="", help="only this task's runs from the store")
    p.add_argument("--seeds", default="", help="comma-separated seeds from the store (default: all)")
    p.add_argument("--plot", help="PNG of final test metric against compute multiple")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if args.store is None:
        from metacore.core.store import default_tracking_uri

        args.store = default_tracking_uri()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    table = rows(args)
    print(f"| method | compute multiple | seeds | val/{args.metric} | test/{args.metric} (mean ± std) | what |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        val = "–" if r["val"] is None else f"{r['val']:.4f}"
        test = "–" if r["test"] is None else f"{r['test']:.4f}"
        if r["test_std"] is not None:
            test += f" ± {r['test_std']:.4f}"
        print(f"| {r['method']} | {r['compute']:.2f}x | {r['seeds']} | {val} | {test} | {r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in table:
            if r["test"] is not None:
                ax.errorbar(r["compute"], r["test"], yerr=r["test_std"] or 0.0, fmt="o", capsize=3)
                ax.annotate(r["method"], (r["compute"], r["test"]), textcoords="offset points", xytext=(5, 4))
        ax.set_xlabel("compute multiple (optimizer steps / one run's budget)")
        ax.set_ylabel(f"final test/{args.metric}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
