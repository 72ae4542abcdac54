"""Final metric against compute multiple, one point per method: `metacore tune` (PBT, PB2, ASHA), a static grid
(`metacore bench --grid lr=...`, its best rate by validation), a single adaptive run (`metacore run`) and the
replay of the PBT winner's schedule. Reads the ``--json`` outputs of those commands; prints a markdown table and
writes a plot.

    python benchmarks/tune_compare.py --metric mae --run hypergrad=hypergrad.json --grid static-grid=grid.json \
        --tune pbt=pbt.json --tune pb2=pb2.json --tune asha=asha.json --run replay-pbt=replay.json --plot out.png

The compute multiple is the optimizer steps of all runs of a method over one run's budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _pair(text: str) -> tuple[str, dict[str, Any]]:
    name, _, path = text.partition("=")
    return name, json.loads(Path(path).read_text())


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    better = min if args.mode == "min" else max
    out = []
    for name, data in map(_pair, args.run or []):
        r = data["runs"][0]
        out.append({"method": name, "compute": r["steps"] / r["steps"], "val": r["final"][f"val/{args.metric}"],
                    "test": r["final"][f"test/{args.metric}"], "note": f"{r['controller']}, {r['steps']} steps"})
    for name, data in map(_pair, args.grid or []):
        runs = data["runs"]
        budget = max(r["steps"] for r in runs)
        best = better(runs, key=lambda r: r["final"][f"val/{args.metric}"])
        out.append({"method": name, "compute": sum(r["steps"] for r in runs) / budget,
                    "val": best["final"][f"val/{args.metric}"], "test": best["final"][f"test/{args.metric}"],
                    "note": f"{len(runs)} rates, best by val: {best['grid']}"})
    for name, data in map(_pair, args.tune or []):
        win = data["winner"]
        out.append({"method": name, "compute": data["compute_multiple"], "val": win["score"] if win else None,
                    "test": win["final"].get(f"test_{args.metric}") if win else None,
                    "note": f"{data['scheduler']}, {data['population']} trials, interval {data['interval']}"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--metric", required=True, help="primary metric without split, e.g. mae or accuracy")
    p.add_argument("--mode", default="min", choices=("min", "max"))
    p.add_argument("--run", action="append", metavar="NAME=JSON", help="`metacore run --json` output")
    p.add_argument("--grid", action="append", metavar="NAME=JSON", help="`metacore bench --json` output")
    p.add_argument("--tune", action="append", metavar="NAME=JSON", help="`metacore tune --json` output")
    p.add_argument("--plot", help="PNG of final test metric against compute multiple")
    args = p.parse_args()
    table = rows(args)
    print(f"| method | compute multiple | val/{args.metric} | test/{args.metric} | what |")
    print("| --- | --- | --- | --- | --- |")
    for r in table:
        val = "–" if r["val"] is None else f"{r['val']:.4f}"
        test = "–" if r["test"] is None else f"{r['test']:.4f}"
        print(f"| {r['method']} | {r['compute']:.2f}x | {val} | {test} | {r['note']} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in table:
            if r["test"] is not None:
                ax.scatter(r["compute"], r["test"])
                ax.annotate(r["method"], (r["compute"], r["test"]), textcoords="offset points", xytext=(5, 4))
        ax.set_xlabel("compute multiple (optimizer steps / one run's budget)")
        ax.set_ylabel(f"final test/{args.metric}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
