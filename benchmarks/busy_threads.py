"""``metacore run`` beside 0, 1 and 2 busy processes, with --threads auto (the default), 1 and 2.

Each busy process is a one-thread torch job (a matrix-product loop), like another user's training job. Each
measurement is a fresh ``python -m metacore run ... --json`` process; the figure is its training wall time
(``runs[0].wall_s``, start-up and evaluation excluded) and the thread count ``auto`` chose. The configurations are
interleaved in rotating order within each repetition, so a drift of the machine hits them alike.

    python benchmarks/busy_threads.py --task digits --preset small --steps 100 --reps 3 --out busy.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BUSY = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\n"
        "while True:\n    a = (a @ a).tanh()\n")


def run_once(args: argparse.Namespace, threads: str, store: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "METACORE_THREADS")}
    cmd = [sys.executable, "-m", "metacore", "run", "--task", args.task, "--controller", "static", "--baseline",
           "none", "--preset", args.preset, "--steps", str(args.steps), "--tracking-uri", store, "--json"]
    if threads != "torch-default":
        cmd += ["--threads", threads]
    load = os.getloadavg()[0]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=1800)
    summary = json.loads(out.stdout)
    return {"threads": threads, "chosen": summary.get("threads"), "wall_s": summary["runs"][0]["wall_s"],
            "load_before": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="digits")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--busy", default="0,1,2", help="numbers of busy processes")
    p.add_argument("--threads", default="auto,1,2")
    p.add_argument("--out", default="busy_threads.json")
    args = p.parse_args()
    configs = args.threads.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        for n_busy in map(int, args.busy.split(",")):
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n_busy)]
            try:
                time.sleep(3 if n_busy else 0)
                for rep in range(args.reps):
                    order = configs[rep % len(configs):] + configs[: rep % len(configs)]
                    for threads in order:
                        r = {"busy": n_busy, "rep": rep, **run_once(args, threads, store)}
                        print(json.dumps(r), flush=True)
                        results.append(r)
            finally:
                for proc in busy:
                    proc.kill()
                    proc.wait()
    summary = {}
    for r in results:
        summary.setdefault(f"busy={r['busy']} threads={r['threads']}", []).append(r["wall_s"])
    table = {k: {"median_s": sorted(v)[len(v) // 2], "all_s": v} for k, v in summary.items()}
    print(json.dumps(table, indent=1))
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "runs": results, "summary": table, "cores": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
    main()
