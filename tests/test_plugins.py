"""Third-party plugins: the documentation covers every hook and its example works; an installed package is found
through its entry point, listed with its distribution and run; broken or clashing packages are reported."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, with_path

from metacore.core import hookspecs
from metacore.testing import make_registry, run_controller

DOCS = REPO / "docs" / "plugins.md"
EXAMPLE = REPO / "examples" / "metacore-example-plugin"
EXAMPLE_DIST = "metacore-example-plugin"


def hook_specs() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(obj) for name, obj in vars(hookspecs).items()
            if callable(obj) and hasattr(obj, f"{hookspecs.PROJECT}_spec")}


def test_every_hook_is_documented_with_its_signature():
    specs = hook_specs()
    assert {"metacore_register_tasks", "metacore_register_controllers"} <= set(specs)
    text = DOCS.read_text()
    for name, sig in specs.items():
        call = f"{name}({', '.join(sig.parameters)})"
        assert f"### `{call}`" in text, f"docs/plugins.md lacks a section for the hook {call}"


def _doc_example() -> str:
    text = DOCS.read_text()
    match = re.search(r"<!-- complete-plugin.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/plugins.md lost its complete-plugin example"
    return match.group(1)


def test_the_documented_plugin_registers_and_trains(tmp_path, monkeypatch):
    source = _doc_example()
    assert len(source.strip().splitlines()) <= 60
    path = tmp_path / "my_plugin.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("my_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    registry = make_registry(module)
    assert set(registry.tasks) == {"iris"} and set(registry.controllers) == {"step-decay"}
    controller = registry.controllers["step-decay"].obj(every=10, gamma=0.5)
    trainer, result = run_controller(controller, registry.tasks["iris"].obj(), steps=30)
    assert not result.diverged and result.steps == 30
    assert result.hparams_final["lr"] == pytest.approx(0.5 * 0.5**2)  # decayed at steps 10 and 20
    assert result.final["val/accuracy"] > 0.7


@pytest.mark.slow
def test_the_documented_plugin_tests_pass(tmp_path):
    """The "Testing a plugin" block of docs/plugins.md, run by pytest against the documented plugin."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    (tmp_path / "my_plugin.py").write_text(_doc_example())
    test_block = next(b for b in blocks if "ControllerContract" in b and "from my_plugin import" in b)
    (tmp_path / "test_my_plugin.py").write_text(test_block)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_plugin.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": with_path(tmp_path)})
    assert res.returncode == 0, res.stdout[-3000:]
    assert re.search(r"\b1[0-9] passed", res.stdout), res.stdout[-500:]


# ---------------------------------------------------------------------------------------------------- installed
@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """The example package installed with pip (no dependencies) into a target folder, built from a copy."""
    root = tmp_path_factory.mktemp("example")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (site / "metacore_example").is_dir()
    return site


def test_installed_example_is_listed_with_its_distribution(example_site, cli):
    res = cli("list", "--json", env={"PYTHONPATH": with_path(example_site)})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    task = next(t for t in data["tasks"] if t["name"] == "breast-cancer")
    ctrl = next(c for c in data["controllers"] if c["name"] == "plateau")
    for item in (task, ctrl):
        assert item["plugin"] == EXAMPLE_DIST
        assert item["distribution"] == f"{EXAMPLE_DIST} 0.1.0"
    assert task["presets"] == ["full", "small", "smoke"] and "lr" in task["hparams"]
    assert set(ctrl["options"]) == {"patience", "factor", "min_delta"}
    if not _installed(EXAMPLE_DIST):  # without the package on the path, neither is there
        plain = json.loads(cli("list", "--json").stdout)
        assert "breast-cancer" not in {t["name"] for t in plain["tasks"]}


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
def test_installed_example_runs(example_site, cli):
    res = cli("run", "--task", "breast-cancer", "--controller", "plateau", "--preset", "smoke", "--steps", "40",
              "--controller-set", "patience=1", "--json", env={"PYTHONPATH": with_path(example_site)})
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    roles = {r["role"]: r for r in summary["runs"]}
    assert roles["controller"]["controller"] == "plateau" and roles["baseline"]["controller"] == "static"
    assert all(r["steps"] == 40 and not r["diverged"] for r in summary["runs"])
    assert roles["controller"]["final"]["val/accuracy"] > 0.8


# ---------------------------------------------------------------------------------------------------- failures
def _fake_dist(site: Path, dist: str, module: str, code: str) -> None:
    """A minimal installed distribution: a module and a dist-info with a ``metacore`` entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[metacore]\n{dist} = {module}\n")


def test_a_broken_plugin_is_reported_and_skipped(tmp_path, cli):
    site = tmp_path / "site"
    _fake_dist(site, "broken-plugin", "broken_plugin", "raise ImportError('needs a package that is not here')\n")
    res = cli("list", "--json", env={"PYTHONPATH": with_path(site)})
    assert res.returncode == 0, res.stderr
    assert "broken-plugin" in res.stderr and "needs a package that is not here" in res.stderr
    assert "digits" in {t["name"] for t in json.loads(res.stdout)["tasks"]}


def test_a_clashing_name_names_both_plugins(tmp_path, cli):
    site = tmp_path / "site"
    _fake_dist(site, "clash-plugin", "clash_plugin", """
        from metacore import hookimpl
        from metacore.plugins.digits import DigitsTask

        class Again(DigitsTask):
            pass

        @hookimpl
        def metacore_register_tasks(register):
            register(Again)
    """)
    env = {"PYTHONPATH": with_path(site)}
    res = cli("list", env=env)  # a conflict: listed, not an error for commands that do not use the name
    assert res.returncode == 0, res.stderr
    assert "conflicts" in res.stdout and "clash-plugin" in res.stdout
    res = cli("run", "--task", "digits", "--controller", "static", "--steps", "5", env=env)
    assert res.returncode == 2
    assert "digits" in res.stderr and "clash-plugin" in res.stderr and "metacore.plugins.digits" in res.stderr
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------------ the contracts bite
def _contract_failures():
    """Controllers that each break one contract, and the contract test that must catch it."""
    from metacore import Controller

    class UnknownName(Controller):
        name = "bad-unknown-name"

        def act(self, state):
            return {"no_such_hparam": 1.0}

    class UnpicklableState(Controller):
        name = "bad-state"

        def state_dict(self):
            return {"fn": len}

    class ForgetsItsCounter(Controller):
        name = "bad-forgets"

        def reset(self, hparams, seed, space, budget):
            super().reset(hparams, seed, space, budget)
            self.calls = 0

        def act(self, state):
            self.calls += 1
            return {"lr": self.initial["lr"] * 0.99**self.calls}

    class TouchesGradients(Controller):
        name = "bad-grads"

        def observe_gradients(self, ctx):
            for g in ctx.grads:
                g.mul_(0.5)

        def after_step(self, ctx):
            pass

    return [(UnknownName, "test_trains_within_bounds"),
            (UnpicklableState, "test_state_dict_is_plain_and_loads_weights_only"),
            (ForgetsItsCounter, "test_state_dict_round_trip_reproduces_the_next_action"),
            (TouchesGradients, "test_state_dict_round_trip_reproduces_the_next_action")]


@pytest.mark.parametrize("index", range(4))
def test_contracts_catch_a_broken_controller(index):
    from metacore.core.errors import ControllerFailed, MetacoreError
    from metacore.testing import ControllerContract, TinyTask

    cls, test_name = _contract_failures()[index]
    contract = ControllerContract()
    with pytest.raises((AssertionError, MetacoreError, ControllerFailed)):
        getattr(contract, test_name)(make_controller=cls, contract_task=TinyTask())
