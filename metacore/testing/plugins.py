"""Plugin managers and registries with chosen plugins only (no module or entry point needed for a class)."""

from __future__ import annotations

from typing import Any

from metacore.core.controller import Controller
from metacore.core.errors import MetacoreError, UsageError
from metacore.core.hookspecs import hookimpl
from metacore.core.registry import PluginManager, Registry, build_registry, get_plugin_manager
from metacore.core.task import Task


# ---------------------------------------------------------------------------------------------------- plugin managers
def class_plugin(*classes: type, name: str = "test-classes") -> Any:
    """A plugin object that registers the given Task and Controller classes (no module or entry point needed)."""
    tasks = [c for c in classes if isinstance(c, type) and issubclass(c, Task)]
    controllers = [c for c in classes if isinstance(c, type) and issubclass(c, Controller)]
    other = [c for c in classes if c not in tasks and c not in controllers]
    if other:
        raise UsageError(f"class_plugin takes Task and Controller subclasses, got {other[0]!r}")

    class _Plugin:
        __name__ = name

        @hookimpl
        def metacore_register_tasks(self, register):
            for cls in tasks:
                register(cls)

        @hookimpl
        def metacore_register_controllers(self, register):
            for cls in controllers:
                register(cls)

    return _Plugin()


def plugin_manager(*plugins: Any, builtins: bool = False, entry_points: bool = False) -> PluginManager:
    """A fresh plugin manager with only ``plugins``: module paths, modules, plugin objects, or Task/Controller classes.

    ``builtins=True`` adds metacore's built-in plugins, ``entry_points=True`` the installed third-party ones.
    """
    from metacore.core.registry import DEFAULT_PLUGINS

    chosen: list[Any] = list(DEFAULT_PLUGINS) if builtins else []
    classes = [p for p in plugins if isinstance(p, type)]
    chosen += [p for p in plugins if not isinstance(p, type)]
    if classes:
        chosen.append(class_plugin(*classes))
    return get_plugin_manager(chosen, entry_points=entry_points)


def make_registry(*plugins: Any, builtins: bool = False, entry_points: bool = False) -> Registry:
    """The registry of :func:`plugin_manager`; import or registration failures raise instead of being skipped."""
    pm = plugin_manager(*plugins, builtins=builtins, entry_points=entry_points)
    registry = build_registry(pm)
    if registry.failures:
        name, reason = next(iter(registry.failures.items()))
        raise MetacoreError(f"plugin {name!r} failed: {reason}")
    if registry.conflicts:
        raise MetacoreError(registry.conflict_message(*next(iter(registry.conflicts))))
    return registry
