"""GPU check: training throughput of the ``full`` presets on one GPU, metacore's fast path on and off.

Run through ``benchmarks/gpu_check.sh`` (which installs carried wheels first); ``--dry`` runs the same code on the
CPU at tiny sizes (the tests do that). Sections:

* ``cifar10``: ResNet-18 (``full`` preset: width 64, batch 64) on the carried CIFAR-10 files, interleaved
  repetitions of ``static`` with ``--precision fp32``, ``static`` with bf16 autocast, ``hypergrad`` with bf16
  autocast, and, with ``--compile``, ``static`` compiled. Images per second = batch / median step time. On CUDA every
  variant has the rest of the fast path (data on the device, channels_last, fused SGD), so ``speedup_vs_fp32`` is
  what bf16 autocast adds on top of it.
* ``imdb``: the ``full`` preset's shape (BERT-base architecture, 12 layers, hidden 768, max length 128, batch 32,
  fused AdamW) on real IMDB reviews. The device has no network, so ``bert-base-uncased``'s weights cannot be
  fetched: the encoder is built from BERT-base's configuration with random initial weights and the bundled
  bert-base-uncased vocabulary (all-MiniLM-L6-v2 uses it). That measures speed, not accuracy. ``static`` fp32 against
  the fast path and ``hypergrad``, sequences per second.

Prints a table and writes ``gpu_check.json`` to ``--out``. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from overhead import Setup, _data_dir, _log, interleave, machine  # noqa: E402


def _throughput(times: dict[str, dict[str, list[float]]], batch: int, unit: str) -> dict[str, Any]:
    out = {}
    for name, t in times.items():
        step = statistics.median(t["wall"])
        out[name] = {"step_ms": round(1000 * step, 3), f"{unit}_per_s": round(batch / step, 1),
                     "step_ms_min": round(1000 * min(t["wall"]), 3), "step_ms_max": round(1000 * max(t["wall"]), 3)}
    return out


def _measure(setup: Setup, variants: dict[str, tuple[str, dict[str, Any]]], steps: int, reps: int, warmup: int,
             unit: str, quiet: bool) -> dict[str, Any]:
    """Build each variant's trainer, warm it up (a compiled model compiles here), time them interleaved."""
    runners, warm_s = {}, {}
    for name, (controller, config) in variants.items():
        trainer = setup.trainer(controller, warmup + steps * reps + 1, **config)
        start = time.perf_counter()
        trainer.advance(warmup)
        warm_s[name] = round(time.perf_counter() - start, 2)
        runners[name] = trainer.advance
        _log(f"  {name}: ready ({warm_s[name]} s warm-up)", quiet)
    times = interleave(runners, steps, reps, setup.device, quiet)
    batch = int(setup.hparams.get("batch_size", 32))
    rows = _throughput(times, batch, unit)
    for name, row in rows.items():
        row["warmup_s"] = warm_s[name]
    base = rows.get("static fp32")
    if base:
        for row in rows.values():
            row["speedup_vs_fp32"] = round(base["step_ms"] / row["step_ms"], 3)
    return {"batch": batch, "steps_per_rep": steps, "reps": reps, "rows": rows}


def cifar10_section(args: argparse.Namespace, device: str, data_dir: Path | None) -> dict[str, Any]:
    root = (data_dir / "cifar10") if data_dir else None
    files = sorted(root.glob("train-*.parquet")) if root and root.is_dir() else []
    if not files or not (root / "test.parquet").is_file():
        return {"skipped": f"no CIFAR-10 parquet files under {root}"}
    if args.dry:
        preset, sets = "smoke", {}
    else:  # the full preset's model and batch on the training files that were carried (10,000 images each)
        available = 10_000 * len(files)
        sets = {"train_size": str(available - 2_000), "val_size": "2000", "test_size": "2000"}
        preset = "full"
    setup = Setup("cifar10", preset, device, data_dir, sets)
    variants = {"static fp32": ("static", {"precision": "fp32"}), "static": ("static", {}),
                "hypergrad": ("hypergrad", {})}
    if args.compile:
        variants["static compiled"] = ("static", {"compile": True})
    out = _measure(setup, variants, args.steps, args.reps, args.warmup, "images", args.json)
    out.update(preset=preset, sets=sets, width=setup.options["width"], train_files=len(files))
    return out


def _bert_base_dir(work: Path, dry: bool, vocab_dir: str | None) -> Path:
    """A local model folder: BERT-base's configuration (tiny when ``dry``), random weights, the bert-base-uncased
    vocabulary from ``vocab_dir`` (carried by ``gpu_check.sh --prepare``) or the bundled MiniLM package."""
    import shutil

    import torch
    import transformers

    if vocab_dir:
        vocab_dir = Path(vocab_dir)
    else:
        from metacore.plugins.imdb import bundled_model_dir

        vocab_dir = bundled_model_dir()
    if not (vocab_dir / "vocab.txt").is_file():
        raise FileNotFoundError(f"no vocab.txt under {vocab_dir}")
    target = work / ("bert-tiny-random" if dry else "bert-base-uncased-random")
    if (target / "config.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (vocab_dir / name).is_file():
            shutil.copy(vocab_dir / name, target / name)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if dry else {}
    config = transformers.BertConfig(num_labels=2, **shape)  # defaults: bert-base-uncased (12 x 768, vocab 30522)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(target)
    return target


def imdb_section(args: argparse.Namespace, device: str, data_dir: Path | None, work: Path) -> dict[str, Any]:
    if not (data_dir and (data_dir / "imdb" / "train.parquet").is_file()):
        return {"skipped": f"no IMDB parquet files under {data_dir}"}
    try:
        model_dir = _bert_base_dir(work, args.dry, args.vocab_dir)
    except Exception as exc:  # the bundled vocabulary or transformers missing
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    sizes = {"train_size": "64", "val_size": "32", "test_size": "32", "max_length": "32"} if args.dry else {
        "train_size": "4000", "val_size": "500", "test_size": "500"}
    setup = Setup("imdb", "full", device, data_dir, {"model": str(model_dir), **sizes})
    variants = {"static fp32": ("static", {"precision": "fp32"}), "static": ("static", {}),
                "hypergrad": ("hypergrad", {})}
    out = _measure(setup, variants, args.steps, args.reps, args.warmup, "sequences", args.json)
    out.update(model="BERT-base configuration, random initial weights (throughput only)" if not args.dry else
               "tiny BERT, random weights (dry run)", max_length=setup.options["max_length"], sets=sizes)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes: checks the script end to end")
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json")
    parser.add_argument("--data-dir", help="data root (default METACORE_DATA_DIR or ../shared/data)")
    parser.add_argument("--vocab-dir", help="folder with the bert-base-uncased vocab.txt (default: the bundled model)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd static run (cifar10)")
    parser.add_argument("--json", action="store_true", help="print the JSON on stdout instead of the table")
    args = parser.parse_args(argv)

    import torch

    if args.dry:
        args.steps, args.reps, args.warmup = min(args.steps, 2), min(args.reps, 2), min(args.warmup, 1)
    device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = _data_dir(args.data_dir)
    start = time.perf_counter()
    result: dict[str, Any] = {"dry": args.dry, "machine": machine(device)}
    _log(f"cifar10 on {device}", args.json)
    result["cifar10"] = cifar10_section(args, device, data_dir)
    _log(f"imdb on {device}", args.json)
    with tempfile.TemporaryDirectory(prefix="metacore-gpu-check-") as work:  # the model folder stays out of --out
        result["imdb"] = imdb_section(args, device, data_dir, Path(work))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2)
    (out_dir / "gpu_check.json").write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(f"\n{'section':<8} {'variant':<16} {'step ms':>9} {'per s':>10} {'vs fp32':>8}")
        for section in ("cifar10", "imdb"):
            part = result[section]
            if "skipped" in part:
                print(f"{section:<8} skipped: {part['skipped']}")
                continue
            for name, row in part["rows"].items():
                rate = row.get("images_per_s", row.get("sequences_per_s"))
                print(f"{section:<8} {name:<16} {row['step_ms']:>9.1f} {rate:>10.1f} "
                      f"{row.get('speedup_vs_fp32', float('nan')):>7.2f}x")
        print(f"\n{result['machine'].get('gpu', device)}; {result['wall_s']} s; JSON: {out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
