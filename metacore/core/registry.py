"""Plugin manager and registry: built-ins and third-party entry points, registered the same way.

A fresh plugin manager is built for every CLI or API call (:func:`get_plugin_manager`); nothing is registered at
import time. A plugin that fails to import is reported by name (``Registry.failures``) and skipped, so one broken
package does not take the CLI down. A name registered twice is an error naming both plugins.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from metacore.core import hookspecs
from metacore.core.errors import RegistryError, UsageError, first_line

ENTRY_POINT_GROUP = "metacore"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "metacore.plugins.digits",
    "metacore.plugins.cifar10",
    "metacore.plugins.imdb",
    "metacore.plugins.electricity",
    "metacore.controllers.static",
    "metacore.controllers.schedules",
    "metacore.controllers.hypergrad",
    "metacore.controllers.autolr",
    "metacore.controllers.replay",
    "metacore.controllers.ppo.plugin",
    "metacore.optimizers.plugin",
)


@dataclass(frozen=True)
class Entry:
    """A registered task, controller or optimizer and where it came from."""

    kind: str  # "task" | "controller" | "optimizer"
    name: str
    obj: Any
    plugin: str
    distribution: str | None = None

    @property
    def description(self) -> str:
        return (getattr(self.obj, "description", "") or (self.obj.__doc__ or "").strip().split("\n")[0]).strip()


@dataclass
class Registry:
    tasks: dict[str, Entry] = field(default_factory=dict)
    controllers: dict[str, Entry] = field(default_factory=dict)
    optimizers: dict[str, Entry] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # plugin name -> one-line reason

    def task(self, name: str) -> Entry:
        return self._get(self.tasks, "task", name)

    def controller(self, name: str) -> Entry:
        return self._get(self.controllers, "controller", name)

    def optimizer(self, name: str) -> Entry:
        return self._get(self.optimizers, "optimizer", name)

    @staticmethod
    def _get(table: dict[str, Entry], kind: str, name: str) -> Entry:
        if name not in table:
            raise UsageError(f"unknown {kind} {name!r} (known: {', '.join(sorted(table)) or 'none'})")
        return table[name]


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus what metacore reports: import failures and the distribution of each plugin."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.failures: dict[str, str] = {}
        self.distributions: dict[str, str] = {}


def get_plugin_manager(plugins: Iterable[Any] | None = None, *, entry_points: bool = True) -> PluginManager:
    """A new plugin manager with the built-ins (or ``plugins``) and, if asked, the ``metacore`` entry points."""
    pm = PluginManager()
    for plugin in DEFAULT_PLUGINS if plugins is None else plugins:
        if isinstance(plugin, str):
            try:
                module = importlib.import_module(plugin)
            except Exception as exc:  # a broken built-in is reported, not fatal
                pm.failures[plugin] = first_line(exc, with_type=True)
                continue
            pm.register(module, name=plugin)
        else:
            pm.register(plugin, name=getattr(plugin, "__name__", None))
    if entry_points:
        _load_entry_points(pm)
    pm.check_pending()
    return pm


def _load_entry_points(pm: PluginManager) -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            pm.failures[ep.name] = first_line(exc, with_type=True)
            continue
        pm.register(plugin, name=ep.name)
        dist = getattr(ep, "dist", None)
        if dist is not None:
            pm.distributions[ep.name] = f"{dist.metadata['Name']} {dist.version}"


def build_registry(pm: PluginManager | None = None) -> Registry:
    """Call every plugin's registration hooks, one plugin at a time so a failure is attributed to its plugin."""
    pm = pm or get_plugin_manager()
    registry = Registry(failures=dict(pm.failures))
    for kind, hook, table in (
        ("task", pm.hook.metacore_register_tasks, registry.tasks),
        ("controller", pm.hook.metacore_register_controllers, registry.controllers),
        ("optimizer", pm.hook.metacore_register_optimizers, registry.optimizers),
    ):
        for impl in hook.get_hookimpls():  # registration order
            plugin_name = impl.plugin_name
            dist = pm.distributions.get(plugin_name)

            def register(obj: Any, name: str | None = None, *, _kind=kind, _table=table, _p=plugin_name, _d=dist):
                _register(_table, _kind, obj, name, _p, _d)

            try:
                impl.function(register=register)
            except RegistryError:
                raise
            except Exception as exc:
                registry.failures[plugin_name] = first_line(exc, with_type=True)
    return registry


def _register(table: dict[str, Entry], kind: str, obj: Any, name: str | None, plugin: str, dist: str | None) -> None:
    from metacore.core.controller import Controller
    from metacore.core.optimizer import Optimizer
    from metacore.core.task import Task

    base = {"task": Task, "controller": Controller, "optimizer": Optimizer}[kind]
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise RegistryError(
            f"plugin {plugin!r} registered {obj!r} as a {kind}, but it is not a {base.__name__} subclass"
        )
    name = name or getattr(obj, "name", None)
    if not name or not isinstance(name, str):
        raise RegistryError(f"plugin {plugin!r} registered a {kind} without a name")
    if name in table:
        raise RegistryError(f"{kind} {name!r} is registered by both {table[name].plugin!r} and {plugin!r}")
    table[name] = Entry(kind=kind, name=name, obj=obj, plugin=plugin, distribution=dist or _builtin_dist(plugin))


def _builtin_dist(plugin: str) -> str | None:
    if plugin.startswith("metacore."):
        from metacore import __version__

        return f"metacore {__version__}"
    return None


def load_registry(plugins: Iterable[Any] | None = None, *, entry_points: bool = True) -> Registry:
    return build_registry(get_plugin_manager(plugins, entry_points=entry_points))
