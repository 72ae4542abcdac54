"""Overhead benchmark: what metacore costs per optimizer step, measured in one process.

Sections (each a function returning a JSON-able dict; add a section by adding a function and a line in ``main``):

* ``controllers``: step time of every registered controller against ``static`` on the same task, model, data and
  seed. Each controller gets its own trainer, warmed up first; then repetitions are interleaved (static, A, B, ...,
  static, A, B, ...) so drifts of the machine hit every controller alike, and the figure is the median over
  repetitions of (controller time / static time of the same repetition).
* ``framework``: the metacore loop against a hand-written loop (filled in by the framework measurement).
* ``machine``: where it ran.

    python benchmarks/overhead.py --task cifar10 --preset small --json
    python benchmarks/overhead.py --task digits --controllers hypergrad --steps 30 --reps 7

Timings are not asserted anywhere; ``--json`` prints one object on stdout
``{"controllers": {name: {"step_time_ratio": r, ...}}, "framework": {...}, "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _data_dir(given: str | None) -> Path | None:
    for candidate in (given, os.environ.get("METACORE_DATA_DIR"), str(REPO.parent / "shared" / "data")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


# ---------------------------------------------------------------------------------------------------- controllers
def measure_controllers(task_name: str, preset_name: str, controllers: list[str] | None, steps: int, reps: int,
                        warmup: int, device: str, data_dir: Path | None, sets: dict[str, str],
                        quiet: bool = False) -> dict[str, Any]:
    """Median step-time ratio of each controller against ``static`` (interleaved repetitions, one process)."""
    import torch

    from metacore.core.registry import load_registry
    from metacore.core.task import TaskContext
    from metacore.core.trainer import Trainer, TrainerConfig

    registry = load_registry()
    task = registry.task(task_name).obj()
    preset = task.preset(preset_name)
    space = task.hparam_space()
    hparams = space.resolve({k: v for k, v in sets.items() if k in space})
    options = task.resolve_options(preset, {k: v for k, v in sets.items() if k not in space})
    names = controllers or sorted(n for n in registry.controllers if n != "static")
    ctx0 = TaskContext(preset, dict(options), 0, device, data_dir, dict(hparams))
    data = task.load_data(ctx0)
    budget = warmup + steps * reps + 1

    trainers: dict[str, Any] = {}
    spent: dict[str, list[float]] = {}  # seconds inside the controller's own calls, per name
    errors: dict[str, str] = {}
    for name in ["static", *names]:
        try:
            controller = registry.controller(name).obj()
            ctx = TaskContext(preset, dict(options), 0, device, data_dir, dict(hparams))
            cfg = TrainerConfig(budget=budget, log_interval=preset.log_interval, eval_interval=10**9)
            trainer = Trainer(task, controller, ctx, hparams, cfg, data=data)
            trainer.advance(warmup)
            trainers[name] = trainer
            spent[name] = _time_controller_calls(controller)
        except Exception as exc:  # a controller that cannot run here is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"
            _log(f"  {name}: skipped ({errors[name]})", quiet)
    if "static" not in trainers:
        raise RuntimeError(f"static baseline failed: {errors.get('static')}")

    def timed(trainer) -> tuple[float, float]:
        """Wall and process-CPU seconds per step. On a busy shared CPU the CPU time is the steadier figure."""
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        trainer.advance(steps)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps

    times: dict[str, list[float]] = {name: [] for name in trainers}
    cpu_times: dict[str, list[float]] = {name: [] for name in trainers}
    for box in spent.values():
        box[0] = box[1] = 0.0  # count the timed repetitions only
    for rep in range(reps):
        for name, trainer in trainers.items():
            wall, cpu = timed(trainer)
            times[name].append(wall)
            cpu_times[name].append(cpu)
        _log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{n} {1000 * t[-1]:.1f} ms" for n, t in times.items()), quiet)

    out: dict[str, Any] = {}
    for name in names:
        if name not in trainers:
            out[name] = {"error": errors[name]}
            continue
        ratios = [t / s for t, s in zip(times[name], times["static"], strict=True)]
        cpu_ratios = [t / s for t, s in zip(cpu_times[name], cpu_times["static"], strict=True) if s > 0]
        out[name] = {
            "step_time_ratio": round(statistics.median(ratios), 4),
            "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
            "step_ms": round(1000 * statistics.median(times[name]), 3),
            # time inside the controller's own calls (observe_gradients, act, after_step), per step: less exposed
            # to a busy machine than the difference of two step times
            "step_cpu_ratio": round(statistics.median(cpu_ratios), 4) if cpu_ratios else None,
            "controller_ms": round(1000 * spent[name][0] / (steps * reps), 4),
            "controller_cpu_ms": round(1000 * spent[name][1] / (steps * reps), 4),
            "controller_cpu_share": round(spent[name][1] / (steps * reps) / max(1e-12, statistics.median(
                cpu_times["static"])), 5),
            "static_step_ms": round(1000 * statistics.median(times["static"]), 3),
            "reps": reps, "steps_per_rep": steps,
        }
    return {"task": task_name, "preset": preset_name, "device": device, "hparams": hparams,
            "model_params": sum(p.numel() for p in trainers["static"].model.parameters()), "results": out}


def _time_controller_calls(controller: Any) -> list[float]:
    """Wrap the controller's per-step methods to accumulate the seconds spent in them (a one-element box)."""
    box = [0.0, 0.0]  # wall, process CPU
    for method in ("observe_gradients", "act", "after_step"):
        inner = getattr(controller, method, None)
        if inner is None:
            continue

        def timed(*args, _inner=inner, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return _inner(*args, **kwargs)
            finally:
                box[0] += time.perf_counter() - start
                box[1] += time.process_time() - cpu

        setattr(controller, method, timed)
    return box


# ---------------------------------------------------------------------------------------------------- framework
def measure_framework(args: argparse.Namespace) -> dict[str, Any]:
    """The metacore loop against a hand-written loop; not measured by this section yet."""
    return {}


# ---------------------------------------------------------------------------------------------------- machine
def machine(device: str) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="cifar10")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--controllers", help="comma-separated (default: every registered controller)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median ratio)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per controller first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hparam or task option")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: controllers, framework")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args(argv)

    from metacore.core.runner import resolve_device

    device = resolve_device(args.device)
    sets = dict(item.split("=", 1) for item in args.set)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    result: dict[str, Any] = {"controllers": {}, "framework": {}, "machine": machine(device)}
    if "controllers" not in skip:
        _log(f"controllers vs static on {args.task} ({args.preset}), {args.reps} x {args.steps} steps", args.json)
        section = measure_controllers(args.task, args.preset,
                                      [c for c in (args.controllers or "").split(",") if c] or None,
                                      args.steps, args.reps, args.warmup, device, _data_dir(args.data_dir), sets,
                                      quiet=args.json)
        result["controllers"] = section.pop("results")
        result["controllers_setup"] = section
    if "framework" not in skip:
        result["framework"] = measure_framework(args)
    text = json.dumps(result, indent=None if args.json else 2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for name, r in result["controllers"].items():
            print(f"{name:>16}: " + (f"step time x{r['step_time_ratio']:.3f} of static "
                                     f"({r['step_ms']:.1f} vs {r['static_step_ms']:.1f} ms; "
                                     f"{r['controller_ms']:.2f} ms in the controller; CPU-time ratio "
                                     f"x{r['step_cpu_ratio']:.3f}, controller {r['controller_cpu_ms']:.2f} ms CPU)"
                                     if "step_time_ratio" in r else r["error"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
