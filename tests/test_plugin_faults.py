"""A plugin author's mistakes: each is reported once by name and skipped, and everything else keeps working."""

import json
import math
import subprocess
import sys
import types

import pytest

from metacore import Controller, HParamSpace, HParamSpec, hookimpl
from metacore.core.errors import ControllerFailed, RegistryError, UsageError
from metacore.core.options import OptionSpec
from metacore.core.registry import DEFAULT_PLUGINS, build_registry, get_plugin_manager
from metacore.testing import TinyTask, run_controller
from tests.conftest import fake_distribution, with_path


def _module(name, **functions):
    mod = types.ModuleType(name)
    for key, fn in functions.items():
        setattr(mod, key, fn)
    return mod


def _registry(*plugins):
    return build_registry(get_plugin_manager([*DEFAULT_PLUGINS, *plugins], entry_points=False))


class OutOfBounds(TinyTask):
    name = "oob"

    def hparam_space(self):
        return HParamSpace([HParamSpec("lr", 5.0, 1e-4, 1.0, log=True)])


class Plateau(Controller):
    name = "plateau"


def test_task_default_outside_its_bounds_is_skipped_naming_task_class_and_hook():
    @hookimpl
    def metacore_register_tasks(register):
        register(OutOfBounds)
        register(TinyTask)  # the plugin's other, sound task stays

    reg = _registry(_module("oob_plugin", metacore_register_tasks=metacore_register_tasks))
    reason = reg.failures["oob_plugin"]
    assert "metacore_register_tasks" in reason and "'oob'" in reason and "OutOfBounds" in reason
    assert "hparam_space()" in reason and "outside" in reason
    assert "oob" not in reg.tasks and "tiny" in reg.tasks and "digits" in reg.tasks


def test_misspelt_hook_is_named_with_the_right_one_and_the_plugin_skipped():
    @hookimpl
    def metacore_register_controller(register):
        register(Plateau)

    reg = _registry(_module("typo_plugin", metacore_register_controller=metacore_register_controller))
    assert "'metacore_register_controller'" in reg.failures["typo_plugin"]
    assert "did you mean 'metacore_register_controllers'" in reg.failures["typo_plugin"]
    assert "plateau" not in reg.controllers and "static" in reg.controllers


def test_hook_without_hookimpl_is_reported_not_silent():
    def metacore_register_controllers(register):  # no @hookimpl
        register(Plateau)

    reg = _registry(_module("bare_plugin", metacore_register_controllers=metacore_register_controllers))
    assert "not decorated with @metacore.hookimpl" in reg.failures["bare_plugin"]
    assert "metacore_register_controllers" in reg.failures["bare_plugin"]
    assert "static" in reg.controllers


def test_registering_a_non_controller_skips_only_that_entry():
    @hookimpl
    def metacore_register_controllers(register):
        register(object)
        register(Plateau)

    reg = _registry(_module("odd_plugin", metacore_register_controllers=metacore_register_controllers))
    assert "not a Controller subclass" in reg.failures["odd_plugin"]
    assert "plateau" in reg.controllers


def test_duplicate_is_an_error_only_where_the_name_is_used():
    class Twin(Controller):
        name = "static"

    @hookimpl
    def metacore_register_controllers(register):
        register(Twin)

    reg = _registry(_module("thirdparty", metacore_register_controllers=metacore_register_controllers))
    assert reg.conflicts[("controller", "static")] == ["metacore.controllers.static", "thirdparty"]
    with pytest.raises(RegistryError, match=r"'static' is registered by both 'metacore.controllers.static'.*"
                                            r"'thirdparty'"):
        reg.controller("static")
    assert reg.controller("cosine").name == "cosine" and reg.task("digits").name == "digits"


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_non_finite_controller_value_is_refused_alike_for_floats_and_tensors(kind):
    import torch

    class NaNAt3(Controller):
        name = "nan-at-3"

        def act(self, state):
            if state.step == 3:
                return {"lr": math.nan if kind == "float" else torch.tensor(math.nan)}
            return {}

    with pytest.raises(ControllerFailed) as info:
        run_controller(NaNAt3(), steps=10)
    assert str(info.value) == "controller 'nan-at-3' failed at step 3: controller nan-at-3 proposed non-finite lr=nan"
    assert info.value.bad_input


def test_deferred_device_tensor_check_refuses_at_the_sync():
    import torch

    from metacore.core.errors import ControllerError
    from metacore.core.hparams import check_deferred

    space = TinyTask().hparam_space()
    pending = []
    flag = torch.tensor(math.inf).isfinite()  # what sanitize keeps for a value on an accelerator
    pending.append(("lr", flag, torch.tensor(math.inf)))
    with pytest.raises(ControllerError, match="non-finite lr=inf"):
        check_deferred(pending, "c")
    assert pending == []
    assert float(space.sanitize({"lr": torch.tensor(0.5)}, "c")["lr"]) == pytest.approx(0.5)


@pytest.mark.parametrize("value,shown", [({1, 2}, "builtins.set"), ("numpy", "numpy.float64")])
def test_state_that_cannot_be_checkpointed_is_refused_at_run_start(value, shown):
    import numpy as np

    class Keeper(Controller):
        name = "keeper"

        def state_dict(self):
            return {"seen": np.float64(1.0) if value == "numpy" else value, "ok": 1}

    with pytest.raises(ControllerFailed) as info:
        run_controller(Keeper(), steps=5)
    message = str(info.value)
    assert message.startswith("controller 'keeper' was refused when the run started: ")
    assert f"state_dict()['seen'] is a {shown}" in message and info.value.bad_input


def test_one_sided_bounds_read_naturally():
    with pytest.raises(UsageError) as low:
        OptionSpec("every", 10, int, low=1).parse("0", "controller x")
    assert "must be at least 1, got '0'" in str(low.value) and "None" not in str(low.value)
    with pytest.raises(UsageError) as high:
        OptionSpec("p", 0.1, float, high=0.5).parse("0.9")
    assert "must be at most 0.5" in str(high.value)
    with pytest.raises(UsageError, match=r"must lie in \[0.0, 1.0\]"):
        OptionSpec("f", 0.5, float, low=0.0, high=1.0).parse("2")


BAD_TASK = """
from metacore import HParamSpace, HParamSpec, hookimpl
from metacore.testing import TinyTask

class CharLM(TinyTask):
    name = "charlm"
    def hparam_space(self):
        return HParamSpace([HParamSpec("lr", 0.1, 1e-4, 1.0), HParamSpec("dropout", 0.9, 0.0, 0.5, acts_on="model")])

@hookimpl
def metacore_register_tasks(register):
    register(CharLM)
"""
TYPO = """
from metacore import Controller, hookimpl
class Plateau(Controller):
    name = "plateau"
@hookimpl
def metacore_register_controller(register):
    register(Plateau)
"""
TWIN = """
from metacore import Controller, hookimpl
class C(Controller):
    name = "twin"
@hookimpl
def metacore_register_controllers(register):
    register(C)
"""


def test_cli_with_faulty_plugins_installed(cli, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "charlm-plugin", "charlm_mod", BAD_TASK)
    fake_distribution(site, "typo-plugin", "typo_mod", TYPO)
    fake_distribution(site, "bare-plugin", "bare_mod", "def metacore_register_tasks(register):\n    pass\n")
    fake_distribution(site, "plugin-a", "plugin_a_mod", TWIN)
    fake_distribution(site, "plugin-b", "plugin_b_mod", TWIN)
    env = {"PYTHONPATH": with_path(site)}
    res = cli("list", "--json", env=env)
    assert res.returncode == 0, res.stderr
    warnings = res.stderr.strip().splitlines()
    for dist, words in (("charlm-plugin", ("task 'charlm'", "CharLM", "dropout", "outside")),
                        ("typo-plugin", ("metacore_register_controller",)),
                        ("bare-plugin", ("not decorated with @metacore.hookimpl",))):
        lines = [line for line in warnings if f"'{dist}' ({dist} 0.1)" in line]
        assert len(lines) == 1 and all(w in lines[0] for w in words), res.stderr  # once, by name
    assert "Traceback" not in res.stderr
    listing = json.loads(res.stdout)
    assert {"digits", "cifar10"} <= {t["name"] for t in listing["tasks"]}
    assert [c["name"] for c in listing["conflicts"]] == ["twin"]
    assert sorted(listing["conflicts"][0]["plugins"]) == ["plugin-a", "plugin-b"]
    assert "twin" not in {c["name"] for c in listing["controllers"]}
    res = cli("run", "--task", "digits", "--controller", "twin", "--steps", "5", env=env)
    assert res.returncode == 2 and "'twin' is registered by both" in res.stderr
    assert "'plugin-a' (plugin-a 0.1)" in res.stderr and "'plugin-b' (plugin-b 0.1)" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "mlflow_runs").exists()
    res = cli("run", "--task", "digits", "--controller", "cosine", "--baseline", "none", "--preset", "smoke",
              "--steps", "5", "--json", env=env)  # everything else keeps working, the faults named once
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["runs"][0]["status"] == "FINISHED"
    assert sum("charlm-plugin" in line for line in res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr


def test_list_into_a_closed_pipe_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "metacore", "list", "--json"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written, as with `| head` on long output
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
