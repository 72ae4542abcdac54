"""``hypergrad`` through the Lightning callback against the same LightningModule at a constant learning rate.

The module and data are those of ``examples/lightning_digits.py`` (docs/lightning.md): a small CNN on scikit-learn's
real digits, SGD with momentum 0.9. For each starting rate (the seed's 1e-2 and 100x too small, 1e-4) and each seed,
two runs with the same initial weights and batch order: without a callback (the rate stays constant) and with
``MetacoreCallback("hypergrad", monitor="val_loss")``. Reported: test accuracy and loss of the final weights, the best
validation loss, the highest and the final rate, wall time; mean and sample std over seeds, and the paired difference.

    OMP_NUM_THREADS=1 python benchmarks/lightning_hypergrad.py --seeds 3 --out lightning_hypergrad.json

prints the markdown table of docs/results.md and writes every run to ``--out``. One thread (``--threads``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _example():
    spec = importlib.util.spec_from_file_location("lightning_digits", REPO / "examples" / "lightning_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _best_val_callback():
    """A callback keeping the lowest ``val_loss`` of the run (read where Lightning computed it)."""
    import lightning.pytorch as L

    class BestVal(L.Callback):
        best = float("inf")

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
                self.best = min(self.best, float(trainer.callback_metrics["val_loss"]))

    return BestVal()


def run_one(example, lr: float, seed: int, controller: bool, epochs: int) -> dict:
    import lightning.pytorch as L

    from metacore.integrations.lightning import MetacoreCallback

    L.seed_everything(seed, verbose=False)
    best = _best_val_callback()
    callbacks = [best] + ([MetacoreCallback("hypergrad", monitor="val_loss")] if controller else [])
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        num_sanity_val_steps=0, deterministic=True)
    data = example.Digits(seed=seed)
    module = example.DigitsNet(lr=lr)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    final_lr = peak_lr = float(trainer.optimizers[0].param_groups[0]["lr"])
    if controller:
        used = [h["lr_used"] for _, h in callbacks[-1].history]
        final_lr, peak_lr = used[-1], max(used)
    return {"lr0": lr, "seed": seed, "arm": "hypergrad" if controller else "constant", "steps": trainer.global_step,
            "test_acc": test["test_acc"], "test_loss": test["test_loss"], "best_val_loss": best.best,
            "final_lr": final_lr, "peak_lr": peak_lr, "wall_s": round(wall, 2)}


def table(runs: list[dict]) -> str:
    from metacore.analysis.stats import paired_delta, summarize

    def fmt(values, digits=4):
        s = summarize(values)
        return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}" if s.std is not None else f"{s.mean:.{digits}f}"

    lines = ["| start lr | arm | test accuracy | test loss | best val loss | peak lr | final lr | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    deltas = []
    for lr0 in sorted({r["lr0"] for r in runs}, reverse=True):
        arms = {arm: sorted((r for r in runs if r["lr0"] == lr0 and r["arm"] == arm), key=lambda r: r["seed"])
                for arm in ("constant", "hypergrad")}
        for arm, rs in arms.items():
            lines.append(f"| {lr0:g} | {arm} | {fmt([r['test_acc'] for r in rs])} | "
                         f"{fmt([r['test_loss'] for r in rs])} | {fmt([r['best_val_loss'] for r in rs])} | "
                         f"{fmt([r['peak_lr'] for r in rs], 5)} | {fmt([r['final_lr'] for r in rs], 5)} | "
                         f"{fmt([r['wall_s'] for r in rs], 1)} |")
        d = paired_delta([r["test_acc"] for r in arms["hypergrad"]], [r["test_acc"] for r in arms["constant"]])
        deltas.append(f"start lr {lr0:g}: test accuracy hypergrad - constant = {d.mean:+.4f}"
                      + (f" ± {d.std:.4f}" if d.std is not None else "")
                      + f" (paired over {d.n} seeds; wins/losses/ties {d.wins}/{d.losses}/{d.ties})")
    return "\n".join(lines + [""] + deltas)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=35, help="epochs of 16 steps (batch 64 of 1,078 images)")
    parser.add_argument("--lrs", default="1e-2,1e-4", help="starting rates: the seed's and 100x too small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file of every run")
    args = parser.parse_args(argv)

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    example = _example()
    runs = []
    for lr in (float(v) for v in args.lrs.split(",")):
        for seed in range(args.seeds):
            for controller in (False, True):
                runs.append(run_one(example, lr, seed, controller, args.epochs))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {"runs": runs, "threads": args.threads, "epochs": args.epochs,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "processor": platform.processor() or platform.machine()}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
