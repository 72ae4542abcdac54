"""The real ``metacore`` command in a subprocess."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "mlflow", "transformers", "stable_baselines3", "gymnasium", "matplotlib", "datasets")


def test_help_and_list_import_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "from metacore.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['list', '--json'])\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_list_json_shape(cli):
    res = cli("list", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    digits = next(t for t in data["tasks"] if t["name"] == "digits")
    assert digits["presets"] == ["full", "small", "smoke"]
    assert digits["hparams"]["lr"] == 0.01 and digits["hparams"]["momentum"] == 0.9
    assert digits["plugin"] == "metacore.plugins.digits"
    names = {c["name"] for c in data["controllers"]}
    assert {"static", "cosine", "linear-warmup"} <= names
    for c in data["controllers"]:
        assert set(c) >= {"name", "description", "plugin", "options"}
    only = json.loads(cli("list", "controllers", "--json").stdout)
    assert set(only) == {"controllers"}


BAD_INPUTS = [
    (["--task", "nope", "--controller", "static"], "unknown task 'nope' (known: "),
    (["--task", "digits", "--controller", "nope"], "unknown controller 'nope' (known: "),
    (["--task", "digits", "--controller", "static", "--baseline", "nope"], "unknown controller 'nope'"),
    (["--task", "digits", "--controller", "static", "--set", "zeta=1"], "unknown hyperparameter or option 'zeta'"),
    (["--task", "digits", "--controller", "static", "--set", "lr=abc"], "expects a number"),
    (["--task", "digits", "--controller", "static", "--set", "lr=-1"], "must lie in"),
    (["--task", "digits", "--controller", "static", "--set", "lr=nan"], "must be finite"),
    (["--task", "digits", "--controller", "static", "--set", "lr"], "--set expects KEY=VALUE"),
    (["--task", "digits", "--controller", "cosine", "--controller-set", "bogus=1"], "unknown option 'bogus'"),
    (["--task", "digits", "--controller", "cosine", "--controller-set", "min_factor=2"], "must lie in"),
    (["--task", "digits", "--controller", "hypergrad", "--controller-set", "val_every=0"],
     "option val_every for controller hypergrad must be at least 1, got '0'"),
    (["--task", "digits", "--controller", "static", "--preset", "huge"], "unknown preset 'huge'"),
    (["--task", "digits", "--controller", "static", "--steps", "0"], "--steps must be at least 1"),
    (["--task", "digits", "--controller", "static", "--steps", "ten"], "invalid int value"),
    (["--task", "digits", "--controller", "static", "--data-dir", "/no/such/dir"], "does not exist"),
    (["--task", "digits", "--controller", "static", "--device", "tpu"], "--device must be"),
    (["--task", "digits", "--controller", "static", "--threads", "0"], "--threads must be at least 1"),
    (["--task", "digits"], "required"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(cli, tmp_path, args, message):
    res = cli("run", *args, "--steps", "5") if "--steps" not in args else cli("run", *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    assert not (tmp_path / "mlflow_runs").exists()  # nothing half-written


def test_unwritable_tracking_location_exits_2(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli("run", "--task", "digits", "--controller", "static", "--steps", "5",
              "--tracking-uri", f"sqlite:///{blocker}/sub/mlflow.db")
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "cannot write the MLflow store" in res.stderr


def test_run_json_logs_parent_with_two_children(cli, tmp_path):
    res = cli("run", "--task", "digits", "--controller", "static", "--steps", "60", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)  # stdout is one JSON object and nothing else
    assert set(summary) >= {"parent_run_id", "task", "preset", "runs"}
    roles = [r["role"] for r in summary["runs"]]
    assert roles == ["controller", "baseline"]
    for r in summary["runs"]:
        assert set(r) >= {"run_id", "controller", "role", "seed", "steps", "wall_s", "final", "best",
                          "hparams_final", "diverged"}
        assert r["steps"] == 60 and not r["diverged"]
    # same seed, same data order, same static controller: identical results
    assert summary["runs"][0]["final"] == summary["runs"][1]["final"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow_runs/mlflow.db")
    exp = client.get_experiment_by_name("digits")
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert sorted(c.data.tags["metacore.role"] for c in children) == ["baseline", "controller"]
    for child in children:
        assert child.info.status == "FINISHED"
        for key in ("train/loss", "val/accuracy", "hparam/lr", "system/step_time_ms"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert steps and steps == sorted(steps) and max(steps) <= 60, key
        assert child.data.tags["metacore.task"] == "digits"
        assert child.data.params["seed"] == "0"
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["metacore.role"] == "parent"


def test_human_output_has_table_and_mlflow_hint(cli):
    res = cli("run", "--task", "digits", "--controller", "cosine", "--preset", "smoke", "--seeds", "2")
    assert res.returncode == 0, res.stderr
    assert "mlflow ui --backend-store-uri" in res.stdout
    assert res.stdout.count("cosine") >= 2 and res.stdout.count("static") >= 2
