import types

import pytest

from metacore import Controller, hookimpl
from metacore.core.errors import RegistryError
from metacore.core.registry import DEFAULT_PLUGINS, build_registry, get_plugin_manager, load_registry


def _plugin(name, controllers=(), raises=None):
    mod = types.ModuleType(name)

    @hookimpl
    def metacore_register_controllers(register):
        if raises:
            raise raises
        for c in controllers:
            register(c)

    mod.metacore_register_controllers = metacore_register_controllers
    return mod


class Twin(Controller):
    name = "static"


def test_builtins_register_through_the_hooks():
    reg = load_registry(entry_points=False)
    assert {"static", "cosine", "linear-warmup"} <= set(reg.controllers)
    assert "digits" in reg.tasks
    assert reg.tasks["digits"].plugin == "metacore.plugins.digits"


def test_fresh_manager_per_call():
    assert get_plugin_manager(entry_points=False) is not get_plugin_manager(entry_points=False)


def test_duplicate_name_names_both_plugins():
    pm = get_plugin_manager([*DEFAULT_PLUGINS, _plugin("thirdparty", [Twin])], entry_points=False)
    reg = build_registry(pm)  # a conflict, an error only where the name is used
    with pytest.raises(RegistryError, match=r"'static'.*'metacore.controllers.static'.*'thirdparty'"):
        reg.controller("static")


def test_plugin_that_fails_to_import_is_reported_and_skipped():
    pm = get_plugin_manager([*DEFAULT_PLUGINS, "metacore_no_such_plugin_module"], entry_points=False)
    reg = build_registry(pm)
    assert "metacore_no_such_plugin_module" in reg.failures
    assert "static" in reg.controllers


def test_plugin_whose_hook_raises_is_reported_and_skipped():
    pm = get_plugin_manager([*DEFAULT_PLUGINS, _plugin("broken", raises=RuntimeError("boom"))], entry_points=False)
    reg = build_registry(pm)
    assert reg.failures["broken"] == "metacore_register_controllers raised RuntimeError: boom"
    assert "static" in reg.controllers


def test_registering_a_non_controller_is_reported():
    pm = get_plugin_manager([_plugin("odd", [object])], entry_points=False)
    assert "not a Controller subclass" in build_registry(pm).failures["odd"]


def test_unknown_name_lists_known():
    from metacore.core.errors import UsageError

    with pytest.raises(UsageError, match="known: .*static"):
        load_registry(entry_points=False).controller("nope")
