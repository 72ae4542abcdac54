"""Does averaging the weights help a run that ``autolr`` anneals? One run per seed, the weights averaged on the side.

Trains one ``autolr`` run per seed (the task's own optimizer) and keeps, from the end of the search on, exponential
moving averages of the whole model state (parameters and float buffers) at each ``--decays`` value and uniform
averages over the last ``--tails`` fraction of the budget. At the end it evaluates the test split with the run's own
weights and with each average, each as it is and after re-estimating the BatchNorm statistics on ``--bn-batches``
training batches (forward passes only: ``bn_passes`` says how many, a cost a static run does not have). The averages
change nothing in the run itself, so every row of a seed shares one trajectory.

    OMP_NUM_THREADS=1 python benchmarks/weight_averaging.py --task cifar10 --seeds 0,1 --lr 1e-3 \\
        --data-dir ../shared/data --json wa.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def averaged_run(task_name: str, seed: int, lr: float, preset: str, data_dir: str | None, decays: list[float],
                 tails: list[float], bn_batches: int) -> dict:
    import torch

    from metacore.controllers.autolr import ANNEAL, AutoLRController
    from metacore.core.registry import load_registry
    from metacore.core.trainer import Trainer, TrainerConfig
    from metacore.testing import task_context

    task = load_registry(entry_points=False).task(task_name).obj()
    ctx = task_context(task, preset, seed, data_dir, {"lr": lr})
    ctl = AutoLRController()
    budget = ctx.preset.steps
    trainer = Trainer(task, ctl, ctx, ctx.hparams, TrainerConfig(budget=budget, log_interval=ctx.preset.log_interval,
                                                                eval_interval=10**9))
    model = trainer.model

    def copy_state() -> dict:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    emas: dict[float, dict] = {}
    tail_avg: dict[float, list] = {}  # fraction -> [state, count]
    for step in range(budget):
        trainer.advance(1)
        if ctl.phase != ANNEAL:
            continue
        state = model.state_dict()
        for d in decays:
            if d not in emas:
                emas[d] = copy_state()
                continue
            for k, v in state.items():
                if v.dtype.is_floating_point:
                    emas[d][k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    emas[d][k].copy_(v)
        for frac in tails:
            if step >= budget - int(frac * budget):
                avg = tail_avg.setdefault(frac, [copy_state(), 0])
                avg[1] += 1
                for k, v in state.items():
                    if not v.dtype.is_floating_point:
                        avg[0][k].copy_(v)
                    elif avg[1] > 1:
                        avg[0][k].add_(v.detach() - avg[0][k], alpha=1.0 / avg[1])

    def test_metric() -> float:
        return trainer.evaluate("test", record=False)[task.primary_metric]

    def recalibrate() -> int:
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms or bn_batches <= 0:
            return 0
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
        gen = torch.Generator().manual_seed(seed + 7919)
        model.train()
        with torch.no_grad():
            for _ in range(bn_batches):
                idx = torch.randint(0, trainer.data.train_size, (int(ctx.hparams.get("batch_size", 64)),),
                                    generator=gen)
                model(task.train_batch(trainer.data, idx, ctx)[0])
        model.eval()
        return bn_batches

    own = copy_state()
    rows = {"run": test_metric()}
    candidates = [(f"ema {d}", s) for d, s in emas.items()] + [(f"last {f:.0%} uniform", a[0])
                                                               for f, a in tail_avg.items()]
    passes = 0
    for name, state in [("run", own)] + candidates:
        model.load_state_dict(state)
        model.eval()
        if name != "run":
            rows[name] = test_metric()
        passes = recalibrate()
        if passes:
            rows[f"{name} + BN re-estimated"] = test_metric()
    return {"task": task_name, "seed": seed, "lr0": lr, "peak": ctl.peak, "search_end": ctl.search_end,
            "bn_passes": passes, "test": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="cifar10")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--lr", type=float, default=1e-3, help="the initial rate (autolr's hint)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data-dir")
    ap.add_argument("--decays", default="0.98,0.99,0.995", help="EMA decays per step")
    ap.add_argument("--tails", default="0.3,0.5", help="fractions of the budget averaged uniformly at the end")
    ap.add_argument("--bn-batches", type=int, default=30, help="training batches for re-estimating BatchNorm")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        decays = [float(d) for d in args.decays.split(",") if d]
        tails = [float(f) for f in args.tails.split(",") if f]
        row = averaged_run(args.task, seed, args.lr, args.preset, args.data_dir, decays, tails, args.bn_batches)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        out.append(row)
        print(f"seed {seed} (peak {row['peak']:.3g}): " + ", ".join(f"{k} {v:.4f}" for k, v in row["test"].items()),
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
