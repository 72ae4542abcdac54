"""The benchmark scripts run end to end (tiny sizes, CPU); their numbers are reported, never asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_mode_runs_end_to_end(tmp_path, data_dir):
    env = {**os.environ, "PYTHON": sys.executable, "METACORE_DATA_DIR": str(data_dir)}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry"] is True and result["machine"]["device"] == "cpu"
    for section, unit in (("cifar10", "images_per_s"), ("imdb", "sequences_per_s")):
        rows = result[section]["rows"]
        assert set(rows) == {"static fp32", "static", "hypergrad"}
        assert all(row[unit] > 0 and row["step_ms"] > 0 for row in rows.values())
    assert "static fp32" in proc.stdout and "vs fp32" in proc.stdout  # the table


def test_overhead_json_reports_framework_and_every_controller(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, "benchmarks/overhead.py", "--task", "digits", "--preset", "smoke",
                           "--reps", "2", "--steps", "2", "--warmup", "1", "--json", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    for key in ("metacore_vs_plain_loop", "tracking_overhead"):
        assert result["framework"][key]["step_time_ratio"] > 0
    assert result["framework"]["tracking_overhead"]["train_loss_points_logged"] > 0
    from benchmarks.overhead import default_controllers
    from metacore.core.registry import load_registry

    expected = set(default_controllers(load_registry()))
    assert expected and "static" not in expected
    assert set(result["controllers"]) == expected
    assert all("step_time_ratio" in r for r in result["controllers"].values())
    assert "cli_startup" in result["framework"]
    assert set(result["optimizers"]) == set(load_registry().optimizers)
    assert all(r["step_time_ratio"] > 0 for r in result["optimizers"].values())
    assert result["optimizers"]["prodigy"]["base"] == "adamw"


def test_lr_robustness_summary_judges_against_the_best_of_the_search(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lr_robustness", REPO / "benchmarks" / "lr_robustness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = {
        "static": {0.01: {0: (0.40, 1.0, False), 1: (0.42, 1.0, False)}, 0.1: {0: (0.50, 1.0, False)}},
        "cosine": {0.1: {0: (0.52, 1.0, False), 1: (0.54, 1.0, False)}},
        "autolr": {1e-4: {0: (0.53, 1.0, False), 1: (0.52, 1.0, False)}, 1.0: {0: (0.30, 1.0, True)}},
    }
    summary = mod.summarise(table, "autolr", "max")
    assert summary["best_search"] == {"method": "cosine", "lr0": 0.1, "mean": 0.53}
    rows = {r["lr0"]: r for r in summary["rows"]}
    assert rows[1e-4]["ratio_to_best_search"] == 0.525 / 0.53 and rows[1e-4]["meets_goal"]
    assert not rows[1.0]["meets_goal"] and rows[1.0]["diverged"] == 1
    assert rows[1e-4]["paired_delta_by_seed"] == {0: pytest.approx(0.01), 1: pytest.approx(-0.02)}
    assert rows[1e-4]["paired_delta"] == pytest.approx(-0.005)
    assert rows[1.0]["paired_delta_by_seed"] == {0: pytest.approx(-0.22)}  # seed 1 has no autolr run at 1.0
    assert summary["search_runs"] == 5
    text = mod.markdown(summary, "test/accuracy")
    assert "0.5250 ± 0.0071 (n=2)" in text and "✗" in text
    assert mod.method_of("static", {"optimizer": "default"}) == "static"
    assert mod.method_of("static", {"optimizer": "sf-adamw"}) == "sf-adamw"  # a static run on another optimizer
    assert mod.method_of("autolr", {"optimizer": "adamw"}) == "autolr+adamw"
    assert mod.method_of("cosine", {}) == "cosine"
    for value, ok in ((2.03, True), (2.05, False)):  # lower is better: within 1.02 x the best passes
        low = mod.summarise({"static": {0.1: {0: (2.0, 1.0, False)}}, "autolr": {0.1: {0: (value, 1.0, False)}}},
                            "autolr", "min")
        assert low["rows"][0]["meets_goal"] is ok


def test_lr_robustness_names_a_missing_store_in_one_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lr_robustness", REPO / "benchmarks" / "lr_robustness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--task", "digits", "--experiments", "no-such-experiment",
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "mlflow.db" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_tune_compare_averages_seeds_and_counts_compute(tmp_path):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_compare", REPO / "benchmarks" / "tune_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def tune(score, test):
        return {"compute_multiple": 4.0, "scheduler": "pbt", "population": 4, "interval": 60,
                "winner": {"score": score, "final": {"test_accuracy": test}}}

    def grid(vals_tests):
        return {"runs": [{"steps": 600, "grid": {"lr": lr}, "final": {"val/accuracy": v, "test/accuracy": t}}
                         for lr, (v, t) in vals_tests.items()]}

    files = {}
    for name, obj in {"p0": tune(0.5, 0.48), "p1": tune(0.6, 0.52),
                      "g0": grid({0.1: (0.5, 0.45), 0.01: (0.4, 0.47)}),
                      "g1": grid({0.1: (0.3, 0.30), 0.01: (0.6, 0.55)})}.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(obj))
    args = argparse.Namespace(mode="max", metric="accuracy", run=None, store_run=None, store_grid=None, seeds="",
                              tune=[f"pbt={files['p0']},{files['p1']}"], grid=[f"g={files['g0']},{files['g1']}"])
    by = {r["method"]: r for r in mod.rows(args)}
    assert by["pbt"]["seeds"] == 2 and by["pbt"]["compute"] == 4.0
    assert by["pbt"]["test"] == pytest.approx(0.50) and by["pbt"]["test_std"] == pytest.approx(2 ** 0.5 * 0.02)
    # the grid: per seed the best rate by validation (0.1 on seed 0, 0.01 on seed 1), its test score; 2 runs = 2x
    assert by["g"]["tests"] == [0.45, 0.55] and by["g"]["compute"] == 2.0


def test_autolr_curves_replay_gives_the_controllers_own_peak():
    """Replaying a recorded search through the peak rule must give the peak the run itself took, and other options
    must change it (the offline check the edge was chosen with)."""
    import importlib.util

    from tests.test_autolr import _drive, _flat_then_up

    spec = importlib.util.spec_from_file_location("autolr_curves", REPO / "benchmarks" / "autolr_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from metacore.controllers.autolr import AutoLRController

    ctl = AutoLRController()
    _drive(ctl, 600, _flat_then_up(0.1, 3), lr0=1e-4)
    curve = {"task": "t", "seed": 0, "lr0": 1e-4, "stop_lr": ctl.stop_lr, "peak": ctl.peak,
             "curve_lr": ctl.curve_lr, "curve_loss": ctl.curve_loss}
    [same] = mod.replay([curve], {})
    assert same["peak"] == pytest.approx(ctl.peak) and same["edge_lr"] == ctl.edge_lr
    [off] = mod.replay([curve], {"edge_rise": "0"})
    assert off["edge_lr"] == 0.0 and off["peak"] < same["peak"]
    assert 0.0 <= same["fall"] < 1.0 and same["at_floor"] == same["at_floor"]  # the curve fell; a number at the floor
    assert off["at_floor"] != off["at_floor"]  # no edge, no floor: nan
    assert same["deviations"] > 3 and same["flat_lr"] == 0.0  # the curve fell far beyond its noise: not flat


def test_autolr_curves_record_searches_with_the_chosen_optimizer():
    """``record --optimizer`` must run the search on that optimizer: the rate grows every step from the hint, and
    the losses differ from the task's own optimizer's from the same start."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("autolr_curves", REPO / "benchmarks" / "autolr_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    [adam] = mod.record("digits", [0], [1e-3], None, "smoke", "adam")
    [own] = mod.record("digits", [0], [1e-3], None, "smoke")
    assert (adam["optimizer"], own["optimizer"]) == ("adam", "default")
    lrs = adam["curve_lr"]
    assert len(lrs) >= 3 and all(lrs[i + 1] > lrs[i] for i in range(len(lrs) - 1))
    assert adam["curve_lr"][0] == pytest.approx(own["curve_lr"][0])
    assert adam["curve_loss"] != own["curve_loss"]


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loto_table_pairs_the_policy_with_static_at_the_default_and_the_rule_at_each_start():
    mod = _load_script("loto_table")
    table = {
        "static": {0.01: {0: (0.40, 1.0, False), 1: (0.42, 1.0, False), 2: (0.45, 1.0, False)},
                   0.1: {0: (0.90, 1.0, False)}},  # another rate: never the comparison
        "autolr": {0.01: {0: (0.50, 1.0, False), 1: (0.50, 1.0, False), 2: (0.50, 1.0, False)},
                   1e-4: {0: (0.48, 1.0, False), 1: (0.49, 1.0, False)}},
        "ppo": {0.01: {0: (0.51, 1.0, False), 1: (0.41, 1.0, False), 2: (0.44, 1.0, False)},
                1e-4: {0: (0.50, 1.0, False), 1: (0.47, 1.0, False)}},
    }
    summary = mod.summarise(table, 0.01, "max")
    rows = {r["lr0"]: r for r in summary["rows"]}
    d = rows[0.01]
    assert d["default"] and not rows[1e-4]["default"]
    assert d["vs_static"]["delta_by_seed"] == {0: pytest.approx(0.11), 1: pytest.approx(-0.01),
                                               2: pytest.approx(-0.01)}
    assert (d["vs_static"]["wins"], d["vs_static"]["losses"]) == (1, 2)
    assert not d["beats_static"]  # a better mean from one seed is not "2 of 3 seeds"
    assert not d["at_least_reference"]  # 0.4533 < 0.50
    assert rows[1e-4]["at_least_reference"]  # 0.485 = 0.485
    assert rows[1e-4]["vs_reference"]["ties"] == 0 and rows[1e-4]["vs_reference"]["seeds"] == [0, 1]
    text = mod.markdown(summary, "test/accuracy")
    assert "does not beat static" in text and "below autolr" in text and "1/2/0" in text
    # lower is better: a smaller error counts as a win
    low = mod.summarise({"static": {1.0: {0: (2.0, 1, False), 1: (2.0, 1, False)}},
                         "ppo": {1.0: {0: (1.5, 1, False), 1: (1.9, 1, False)}}}, 1.0, "min")
    assert low["rows"][0]["beats_static"] and low["rows"][0]["vs_static"]["wins"] == 2


def test_loto_table_names_a_missing_experiment_in_one_line(tmp_path, capsys):
    mod = _load_script("loto_table")
    rc = mod.main(["--task", "digits", "--experiments", "no-such-experiment",
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_weight_averaging_evaluates_the_run_and_each_average(tmp_path):
    """One smoke run of the weight-averaging bench: the run's own weights and every average are evaluated, with and
    without re-estimated BatchNorm statistics, and the JSON holds what was printed."""
    out = tmp_path / "wa.json"
    proc = subprocess.run([sys.executable, "benchmarks/weight_averaging.py", "--task", "digits", "--preset", "smoke",
                           "--seeds", "0", "--decays", "0.9", "--tails", "0.5", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [row] = json.loads(out.read_text())
    assert set(row["test"]) == {"run", "ema 0.9", "last 50% uniform"}  # digits has no BatchNorm to re-estimate
    assert row["bn_passes"] == 0 and all(0.0 <= v <= 1.0 for v in row["test"].values())
    assert "seed 0" in proc.stdout
