"""benchmarks/overhead.py runs and prints the documented JSON shape (timings themselves are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_overhead_benchmark_json_shape(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "overhead.py"), "--task", "digits", "--preset", "smoke",
         "--controllers", "hypergrad,cosine", "--steps", "2", "--reps", "2", "--warmup", "1", "--device", "cpu",
         "--json", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) >= {"controllers", "framework", "machine"}
    assert set(result["controllers"]) == {"hypergrad", "cosine"}
    for entry in result["controllers"].values():
        assert entry["step_time_ratio"] > 0 and entry["reps"] == 2 and entry["controller_ms"] >= 0
    assert result["machine"]["device"] == "cpu"
    assert json.loads(out.read_text()) == result
