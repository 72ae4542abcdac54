"""Overhead benchmark: what metacore costs per optimizer step, measured in one process.

Sections (each a function returning a JSON-able dict):

* ``framework``: ``metacore_vs_plain_loop`` — metacore's Trainer (``static`` controller, tracking off) against a
  hand-written PyTorch loop on the same model, optimizer, batches and loss; ``tracking_overhead`` — the Trainer
  logging to a real MLflow SQLite store against tracking off.
* ``controllers``: step time of every registered controller against ``static`` on the same task, model, data and
  seed, plus the time spent inside the controller's own calls (the figure least exposed to a busy machine).
* ``optimizers``: step time of every registered optimizer (``--optimizer``, static controller) against the torch
  optimizer it builds on (``BASE``: D-Adaptation SGD, DoG, Mechanic SGD, Schedule-Free SGD against ``sgd``...),
  on the same task, model, data and seed.
* ``machine``: where it ran.

Every runner is built and warmed up first; then repetitions are interleaved in a rotating order (rep r starts with
runner r mod k), so drifts of the machine hit every runner alike, and each figure is the median over repetitions of
(time / reference time of the same repetition), with the min and max. A repetition is, by default, one logging
interval of the preset, so each holds the same share of per-interval work.

    python benchmarks/overhead.py --task cifar10 --preset small --json
    python benchmarks/overhead.py --task digits --controllers hypergrad --reps 7 --skip framework
    python benchmarks/overhead.py --task cifar10 --skip framework,controllers --optimizers prodigy,sf-sgd

Timings are not asserted anywhere; ``--json`` prints one object on stdout
``{"controllers": {name: {"step_time_ratio": r, ...}}, "optimizers": {name: {"base", "step_time_ratio", ...}},
"framework": {"metacore_vs_plain_loop": {...},
"tracking_overhead": {...}}, "machine": {...}}``.
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


# ---------------------------------------------------------------------------------------------------- timing
def interleave(runners: dict[str, Any], steps: int, reps: int, device: str, quiet: bool,
               clocks: dict[str, list[float]] | None = None) -> dict[str, dict[str, list[float]]]:
    """Time ``runner(steps)`` for every runner, ``reps`` times, interleaved and in a rotating order (rep r starts
    with runner r mod k), so drifts of the machine and any advantage of going first hit every runner alike.
    Returns per runner the wall and process-CPU seconds per step of each repetition."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    names = list(runners)
    out: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for box in (clocks or {}).values():
        box[0] = box[1] = 0.0  # count the timed repetitions only
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            sync()
            start, cpu = time.perf_counter(), time.process_time()
            runners[name](steps)
            sync()
            out[name]["wall"].append((time.perf_counter() - start) / steps)
            out[name]["cpu"].append((time.process_time() - cpu) / steps)
        _log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{n} {1000 * out[n]['wall'][-1]:.1f} ms" for n in names), quiet)
    return out


def ratio(times: dict[str, dict[str, list[float]]], name: str, reference: str) -> dict[str, Any]:
    """Median, min and max over repetitions of (``name``'s step time / ``reference``'s in the same repetition)."""
    walls = [t / s for t, s in zip(times[name]["wall"], times[reference]["wall"], strict=True)]
    cpus = [t / s for t, s in zip(times[name]["cpu"], times[reference]["cpu"], strict=True) if s > 0]
    return {"ratio": round(statistics.median(walls), 4), "ratio_min": round(min(walls), 4),
            "ratio_max": round(max(walls), 4), "cpu_ratio": round(statistics.median(cpus), 4) if cpus else None,
            "step_ms": round(1000 * statistics.median(times[name]["wall"]), 3),
            "reference_step_ms": round(1000 * statistics.median(times[reference]["wall"]), 3),
            "reps": len(walls)}


class Setup:
    """One task's model, data and hyperparameters, shared by every measurement of a section."""

    def __init__(self, task_name: str, preset_name: str, device: str, data_dir: Path | None,
                 sets: dict[str, str]) -> None:
        from metacore.core.registry import load_registry

        self.registry = load_registry()
        self.task = self.registry.task(task_name).obj()
        self.preset = self.task.preset(preset_name)
        space = self.task.hparam_space()
        self.hparams = space.resolve({k: v for k, v in sets.items() if k in space})
        self.options = self.task.resolve_options(self.preset, {k: v for k, v in sets.items() if k not in space})
        self.device, self.data_dir = device, data_dir
        self.data = self.task.load_data(self.context())

    def context(self):
        from metacore.core.task import TaskContext

        return TaskContext(self.preset, dict(self.options), 0, self.device, self.data_dir, dict(self.hparams))

    def trainer(self, controller_name: str, budget: int, tracker: Any = None, run_id: str | None = None,
                **config: Any):
        from metacore.core.trainer import Trainer, TrainerConfig

        controller = self.registry.controller(controller_name).obj()
        cfg = TrainerConfig(budget=budget, log_interval=self.preset.log_interval, eval_interval=10**9, **config)
        return Trainer(self.task, controller, self.context(), self.hparams, cfg, data=self.data, tracker=tracker,
                       run_id=run_id)


class PlainLoop:
    """The loop a user would write by hand: the task's model, optimizer, batches and loss, nothing else (no logging,
    no controller, no host sync). Same initial weights as the Trainer; its own random data order."""

    def __init__(self, setup: Setup) -> None:
        import torch

        self.task, self.data, self.ctx = setup.task, setup.data, setup.context()
        torch.manual_seed(0)
        self.model = self.task.build_model(self.data, self.ctx).to(self.ctx.device)
        self.optimizer = self.task.build_optimizer(self.model, dict(setup.hparams), self.ctx)
        self.model.train()
        self.batch_size = int(setup.hparams.get("batch_size", 32))
        self.epoch, self.pos, self.perm = 0, 0, torch.randperm(self.data.train_size)

    def advance(self, n: int) -> None:
        import torch

        for _ in range(n):
            if self.pos + self.batch_size > self.data.train_size:
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = torch.randperm(self.data.train_size)
            indices = self.perm[self.pos : self.pos + self.batch_size]
            self.pos += self.batch_size
            batch = self.task.train_batch(self.data, indices, self.ctx)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.task.loss(self.model, batch)
            loss.backward()
            self.optimizer.step()


# ---------------------------------------------------------------------------------------------------- controllers
def default_controllers(registry: Any) -> list[str]:
    """Every registered controller but ``static`` that runs with its default options (``replay`` needs a run)."""
    from metacore.core.errors import UsageError

    names = []
    for name, entry in sorted(registry.controllers.items()):
        try:
            entry.obj()
        except UsageError:
            continue
        if name != "static":
            names.append(name)
    return names


def measure_controllers(setup: Setup, controllers: list[str] | None, steps: int, reps: int, warmup: int,
                        quiet: bool = False) -> dict[str, Any]:
    """Median step-time ratio of each controller against ``static`` (interleaved repetitions, one process)."""
    names = controllers or default_controllers(setup.registry)
    budget = warmup + steps * reps + 1
    trainers: dict[str, Any] = {}
    spent: dict[str, list[float]] = {}  # seconds inside the controller's own calls, per name
    errors: dict[str, str] = {}
    for name in ["static", *names]:
        try:
            trainer = setup.trainer(name, budget)
            trainer.advance(warmup)
            trainers[name] = trainer
            spent[name] = _time_controller_calls(trainer.controller, trainer.driver)
        except Exception as exc:  # a controller that cannot run here is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"
            _log(f"  {name}: skipped ({errors[name]})", quiet)
    if "static" not in trainers:
        raise RuntimeError(f"static baseline failed: {errors.get('static')}")
    times = interleave({n: t.advance for n, t in trainers.items()}, steps, reps, setup.device, quiet, spent)

    out: dict[str, Any] = {}
    static_cpu = statistics.median(times["static"]["cpu"])
    static_wall = statistics.median(times["static"]["wall"])
    for name in names:
        if name not in trainers:
            out[name] = {"error": errors[name]}
            continue
        r = ratio(times, name, "static")
        controller_s = spent[name][0] / (steps * reps)
        out[name] = {
            "step_time_ratio": r["ratio"], "ratio_min": r["ratio_min"], "ratio_max": r["ratio_max"],
            "step_ms": r["step_ms"], "static_step_ms": r["reference_step_ms"], "step_cpu_ratio": r["cpu_ratio"],
            # time inside the controller's own calls (observe_gradients, act, after_step) and the driver's work
            # for its per-tensor rates, per step: less exposed to a busy machine than the difference of two step
            # times
            "controller_ms": round(1000 * controller_s, 4),
            "controller_cpu_ms": round(1000 * spent[name][1] / (steps * reps), 4),
            "controller_share": round(controller_s / max(1e-12, static_wall), 5),
            "controller_cpu_share": round(spent[name][1] / (steps * reps) / max(1e-12, static_cpu), 5),
            "reps": reps, "steps_per_rep": steps,
        }
    return {"task": setup.task.name, "preset": setup.preset.name, "device": setup.device, "hparams": setup.hparams,
            "model_params": sum(p.numel() for p in trainers["static"].model.parameters()), "results": out}


def _time_controller_calls(controller: Any, driver: Any = None) -> list[float]:
    """Wrap the controller's per-step methods to accumulate the seconds spent in them (a two-element box), and the
    driver's work for the controller's per-tensor rates (the copies before the step, the scaling after it)."""
    box = _time_calls(controller, ("observe_gradients", "act", "after_step"))  # tensor_rates: inside _take_rates
    if driver is not None:
        _time_calls(driver, ("_take_rates", "_apply_rates"), box)
    return box


def _time_calls(obj: Any, methods: tuple[str, ...], box: list[float] | None = None) -> list[float]:
    """Wrap ``obj``'s methods to accumulate the seconds spent in them: a two-element box [wall, process CPU]."""
    box = [0.0, 0.0] if box is None else box
    for method in methods:
        inner = getattr(obj, method, None)
        if inner is None:
            continue

        def timed(*args, _inner=inner, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return _inner(*args, **kwargs)
            finally:
                box[0] += time.perf_counter() - start
                box[1] += time.process_time() - cpu

        setattr(obj, method, timed)
    return box


# ---------------------------------------------------------------------------------------------------- optimizers
BASE = {"dadapt-sgd": "sgd", "dadapt-adam": "adam", "prodigy": "adamw", "dog": "sgd", "ldog": "sgd",
        "mechanic-sgd": "sgd", "mechanic-adamw": "adamw", "sf-sgd": "sgd", "sf-adamw": "adamw"}


def measure_optimizers(setup: Setup, optimizers: list[str] | None, steps: int, reps: int, warmup: int,
                       quiet: bool = False) -> dict[str, Any]:
    """Median step-time ratio of each optimizer against the torch optimizer it builds on (``BASE``; ``sgd`` for one
    not listed), static controller, interleaved repetitions in one process."""
    from metacore.core.optimizer import select_optimizer
    from metacore.core.task import TaskContext
    from metacore.core.trainer import Trainer, TrainerConfig

    names = optimizers or sorted(setup.registry.optimizers)
    wanted = sorted({*names, *(BASE.get(n, "sgd") for n in names)})
    budget = warmup + steps * reps + 1
    trainers: dict[str, Any] = {}
    spent: dict[str, list[float]] = {}  # seconds inside optimizer.step(), per name
    errors: dict[str, str] = {}
    for name in wanted:
        try:
            task, _opt, _ = select_optimizer(setup.registry, setup.task, name, {})
            hparams = task.hparam_space().resolve({})
            ctx = TaskContext(setup.preset, dict(setup.options), 0, setup.device, setup.data_dir, dict(hparams))
            cfg = TrainerConfig(budget=budget, log_interval=setup.preset.log_interval, eval_interval=10**9)
            trainer = Trainer(task, setup.registry.controller("static").obj(), ctx, hparams, cfg, data=setup.data)
            trainer.advance(warmup)
            trainers[name] = trainer
            spent[name] = _time_calls(trainer.optimizer, ("step",))
        except Exception as exc:  # an optimizer that cannot run here (package missing...) is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"
            _log(f"  {name}: skipped ({errors[name]})", quiet)
    times = interleave({n: t.advance for n, t in trainers.items()}, steps, reps, setup.device, quiet, spent)
    out: dict[str, Any] = {}
    for name in names:
        base = BASE.get(name, "sgd")
        if name not in trainers or base not in trainers:
            out[name] = {"base": base, "error": errors.get(name) or errors.get(base)}
            continue
        r = ratio(times, name, base)
        out[name] = {"base": base, "step_time_ratio": r["ratio"], "ratio_min": r["ratio_min"],
                     "ratio_max": r["ratio_max"], "step_ms": r["step_ms"], "base_step_ms": r["reference_step_ms"],
                     "step_cpu_ratio": r["cpu_ratio"], "reps": reps, "steps_per_rep": steps,
                     # time inside optimizer.step() per step, against the base's: less exposed to a busy machine
                     "opt_step_ms": round(1000 * spent[name][0] / (steps * reps), 3),
                     "base_opt_step_ms": round(1000 * spent[base][0] / (steps * reps), 3),
                     "opt_step_cpu_ratio": round(spent[name][1] / max(1e-12, spent[base][1]), 4)}
    return out


# ---------------------------------------------------------------------------------------------------- framework
def measure_framework(setup: Setup, steps: int, reps: int, warmup: int, quiet: bool = False) -> dict[str, Any]:
    """metacore's Trainer (``static``, tracking off) against a hand-written loop; tracking on (a real MLflow SQLite
    store in a temporary folder) against off. All three interleaved in one process."""
    import tempfile

    from metacore.core.tracking import MlflowTracker

    budget = warmup + steps * reps + 1
    with tempfile.TemporaryDirectory(prefix="metacore-overhead-") as tmp:
        tracker = MlflowTracker(f"sqlite:///{tmp}/mlflow.db", artifact_root=Path(tmp) / "artifacts")
        run_id = tracker.start_run("overhead", "tracking on")
        # fp32 throughout: the plain loop has no autocast, so the Trainer must not use it either (on CUDA)
        runners = {"plain": PlainLoop(setup).advance,
                   "metacore": setup.trainer("static", budget, precision="fp32").advance,
                   "metacore+mlflow": setup.trainer("static", budget, tracker, run_id, precision="fp32").advance}
        for advance in runners.values():
            advance(warmup)
        times = interleave(runners, steps, reps, setup.device, quiet)
        tracker.end_run(run_id)
        logged = len(tracker.history(run_id, "train/loss"))
    plain, tracked = ratio(times, "metacore", "plain"), ratio(times, "metacore+mlflow", "metacore")
    return {
        "metacore_vs_plain_loop": {"step_time_ratio": plain["ratio"], **plain,
                                   "what": "metacore Trainer, static controller, tracking off / hand-written loop"},
        "tracking_overhead": {"step_time_ratio": tracked["ratio"], **tracked, "train_loss_points_logged": logged,
                              "what": "Trainer with MLflow (SQLite store) / Trainer with tracking off"},
        "task": setup.task.name, "preset": setup.preset.name, "steps_per_rep": steps,
    }


def measure_cli_startup(reps: int = 5) -> dict[str, Any]:
    """Wall seconds of ``metacore --help`` and ``metacore list`` in fresh processes (median and max of ``reps``)."""
    import subprocess

    out: dict[str, Any] = {}
    for args in (["--help"], ["list"]):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "metacore", *args], cwd=REPO, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        out["metacore " + " ".join(args)] = {"median_s": round(statistics.median(times), 3),
                                             "max_s": round(max(times), 3), "reps": reps}
    return out


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
    parser.add_argument("--optimizers", help="comma-separated (default: every registered optimizer)")
    parser.add_argument("--steps", type=int, default=0, help="steps per timed repetition (default: the preset's "
                        "log interval, so every repetition holds one logging step)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (median ratio)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per controller first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hparam or task option")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: controllers, framework, "
                        "optimizers")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args(argv)

    from metacore.app.plan import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sets = dict(item.split("=", 1) for item in args.set)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    result: dict[str, Any] = {"controllers": {}, "optimizers": {}, "framework": {}, "machine": machine(device)}
    setup = Setup(args.task, args.preset, device, _data_dir(args.data_dir), sets)
    args.steps = args.steps or setup.preset.log_interval
    if "framework" not in skip:
        _log(f"framework: plain loop vs metacore vs metacore+mlflow on {args.task} ({args.preset}), "
             f"{args.reps} x {args.steps} steps", args.json)
        result["framework"] = measure_framework(setup, args.steps, args.reps, args.warmup, quiet=args.json)
        result["framework"]["cli_startup"] = measure_cli_startup()
    if "controllers" not in skip:
        _log(f"controllers vs static on {args.task} ({args.preset}), {args.reps} x {args.steps} steps", args.json)
        section = measure_controllers(setup, [c for c in (args.controllers or "").split(",") if c] or None,
                                      args.steps, args.reps, args.warmup, quiet=args.json)
        result["controllers"] = section.pop("results")
        result["controllers_setup"] = section
    if "optimizers" not in skip:
        _log(f"optimizers vs their base on {args.task} ({args.preset}), {args.reps} x {args.steps} steps", args.json)
        result["optimizers"] = measure_optimizers(setup, [o for o in (args.optimizers or "").split(",") if o] or None,
                                                  args.steps, args.reps, args.warmup, quiet=args.json)
    text = json.dumps(result, indent=None if args.json else 2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for command, r in result["framework"].get("cli_startup", {}).items():
            print(f"{command:>24}: {r['median_s']:.3f} s (max {r['max_s']:.3f} s)")
        for key, r in result["framework"].items():
            if isinstance(r, dict) and "step_time_ratio" in r:
                print(f"{key:>24}: x{r['step_time_ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}; "
                      f"{r['step_ms']:.1f} vs {r['reference_step_ms']:.1f} ms; CPU-time ratio x{r['cpu_ratio']:.3f})")
        for name, r in result["controllers"].items():
            print(f"{name:>24}: " + (f"step time x{r['step_time_ratio']:.3f} of static "
                                     f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}; {r['step_ms']:.1f} vs "
                                     f"{r['static_step_ms']:.1f} ms; {r['controller_ms']:.2f} ms = "
                                     f"{100 * r['controller_share']:.2f}% in the controller)"
                                     if "step_time_ratio" in r else r["error"]))
        for name, r in result["optimizers"].items():
            print(f"{name:>24}: " + (f"step time x{r['step_time_ratio']:.3f} of {r['base']} "
                                     f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}; {r['step_ms']:.1f} vs "
                                     f"{r['base_step_ms']:.1f} ms; inside step() {r['opt_step_ms']:.2f} vs "
                                     f"{r['base_opt_step_ms']:.2f} ms)" if "step_time_ratio" in r else r["error"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
