"""Record ``autolr``'s search curves (the rate and loss of each search step) and what it read off them, or replay
recorded curves through the peak rule with other options, offline. This is how the edge (docs/controllers.md) was
chosen: the second version's searches were recorded, then the rule was replayed on them before any run.

    OMP_NUM_THREADS=1 python benchmarks/autolr_curves.py record --task cifar10 --seeds 0,1,2 \
        --lrs 1e-4,1e-3,1e-2,1e-1,1.0 --data-dir ../shared/data --out curves-cifar10.json [--optimizer adamw]
    python benchmarks/autolr_curves.py replay curves-cifar10.json --set edge_rise=0

``record`` trains only the search (at most ``search_frac`` of the `small` budget) of each (seed, rate); the search is
the run's own first steps, so its curve is the one a full `metacore run` would see. ``replay`` prints, per curve,
the peak the rule gives with the options of ``--set`` (stop/backoff, the centred minimum, the edge, a flat curve's
plateau end), and how flat the
curve was (how far its centred loss fell to the minimum, and how far above the minimum it is at the edge's floor).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def record(task_name: str, seeds: list[int], lrs: list[float], data_dir: str, preset: str,
           optimizer: str | None = None) -> list[dict]:
    from metacore.controllers.autolr import AutoLRController
    from metacore.core.optimizer import select_optimizer
    from metacore.core.registry import load_registry
    from metacore.core.trainer import Trainer, TrainerConfig
    from metacore.testing import task_context

    registry = load_registry(entry_points=False)
    task, _, _ = select_optimizer(registry, registry.task(task_name).obj(), optimizer, {})
    out = []
    for seed in seeds:
        for lr0 in lrs:
            ctx = task_context(task, preset, seed, data_dir, {"lr": lr0})
            config = TrainerConfig(budget=ctx.preset.steps, log_interval=ctx.preset.log_interval, eval_interval=10**9)
            ctl = AutoLRController()
            trainer = Trainer(task, ctl, ctx, ctx.hparams, config)
            while ctl.phase == "search":
                trainer.advance(1)
            row = {"task": task_name, "optimizer": optimizer or "default", "seed": seed, "lr0": lr0,
                   "stop_lr": ctl.stop_lr, "kept_lr": ctl.kept_lr,
                   "centered_lr": ctl.centered_lr, "edge_lr": ctl.edge_lr, "peak": ctl.peak, "end": ctl.search_end}
            print(json.dumps(row), flush=True)
            out.append({**row, "curve_lr": ctl.curve_lr, "curve_loss": ctl.curve_loss})
    return out


def shape(curve_lr: list[float], curve_loss: list[float], window: int, centred: float, floor: float) -> dict:
    """How flat a search curve is, on the controller's centred averages (``window`` steps either side, whole windows
    where there are some): ``fall``, the fraction the average fell from the first whole window to the minimum at
    ``centred``; ``at_floor``, the fraction the average at the rate nearest ``floor`` lies above that minimum."""
    n = len(curve_loss)
    if n < 2 or window <= 0 or centred <= 0:
        return {"fall": math.nan, "at_floor": math.nan, "lowest": math.nan}

    def mean(i: int) -> float:
        lo, hi = max(0, i - window), min(n, i + window + 1)
        return sum(curve_loss[lo:hi]) / (hi - lo)

    first = window if n > 2 * window else 0
    lowest = mean(curve_lr.index(centred))
    near = min(range(n), key=lambda i: abs(math.log(curve_lr[i] / floor))) if floor > 0 else None
    return {"fall": 1 - lowest / mean(first),
            "at_floor": mean(near) / lowest - 1 if near is not None else math.nan, "lowest": lowest}


def replay(curves: list[dict], options: dict[str, float]) -> list[dict]:
    """The peak of the rule with ``options`` on each recorded curve (a search that stopped past its minimum), and
    the curve's shape there (:func:`shape`, at the floor ``edge_lr / edge_backoff``)."""
    from metacore.controllers.autolr import AutoLRController

    rows = []
    for r in curves:
        ctl = AutoLRController(**options)
        ctl.curve_lr, ctl.curve_loss, ctl.hint = r["curve_lr"], r["curve_loss"], r["lr0"]
        ctl.read_curve()
        peak = ctl.capped(r["stop_lr"] / ctl.config["backoff"])
        floor = ctl.edge_lr / ctl.config["edge_backoff"]
        form = shape(ctl.curve_lr, ctl.curve_loss, ctl.config["window"], ctl.centered_lr, floor)
        k, noise = ctl.config["window"], ctl._noise()
        lowest = form["lowest"]
        rows.append({"task": r["task"], "optimizer": r.get("optimizer", "default"), "seed": r["seed"],
                     "lr0": r["lr0"], "recorded_peak": r["peak"], "centered_lr": ctl.centered_lr,
                     "edge_lr": ctl.edge_lr, "flat_lr": ctl.flat_lr, "peak": peak, "deviations": ctl.fall_deviations(),
                     "stop_over_edge": r["stop_lr"] / ctl.edge_lr if ctl.edge_lr > 0 else math.nan,
                     # how far the loss at the floor lies above the minimum, in noise deviations of a window's mean
                     "at_floor_deviations": (form["at_floor"] * lowest / (noise / math.sqrt(2 * k + 1))
                                             if noise > 0 and k > 0 else math.nan),
                     "fall": form["fall"], "at_floor": form["at_floor"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--task", required=True)
    rec.add_argument("--seeds", default="0")
    rec.add_argument("--lrs", required=True, help="comma-separated initial rates")
    rec.add_argument("--preset", default="small")
    rec.add_argument("--optimizer", default=None, help="a registered optimizer (default: the task's own)")
    rec.add_argument("--data-dir", default="../shared/data")
    rec.add_argument("--out", required=True)
    rep = sub.add_parser("replay")
    rep.add_argument("curves", nargs="+", help="files written by record")
    rep.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="autolr option (repeatable)")
    args = p.parse_args()
    if args.command == "record":
        curves = record(args.task, [int(s) for s in args.seeds.split(",")], [float(x) for x in args.lrs.split(",")],
                        args.data_dir, args.preset, args.optimizer)
        Path(args.out).write_text(json.dumps(curves))
        return
    options = dict(item.partition("=")[::2] for item in args.set)  # parsed and checked by the controller's specs
    curves = [c for path in args.curves for c in json.loads(Path(path).read_text())]
    print("| task | optimizer | seed | initial lr | recorded peak | centred minimum | edge | "
          "flat curve: plateau end / flat_backoff | peak | fall to the minimum | the fall in noise deviations | "
          "above it at edge/edge_backoff | the same in noise deviations | stop rate / edge |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in replay(curves, options):
        print(f"| {r['task']} | {r['optimizer']} | {r['seed']} | {r['lr0']:g} | {r['recorded_peak']:.3g} | "
              f"{r['centered_lr']:.3g} | {r['edge_lr']:.3g} | {r['flat_lr']:.3g} | {r['peak']:.3g} | "
              f"{r['fall']:.3f} | {r['deviations']:.1f} | "
              f"{r['at_floor']:.3f} | {r['at_floor_deviations']:.1f} | {r['stop_over_edge']:.1f} |")


if __name__ == "__main__":
    main()
