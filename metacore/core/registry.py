"""Plugin manager and registry: built-ins and third-party entry points, registered the same way.

A fresh plugin manager is built for every CLI or API call (:func:`get_plugin_manager`); nothing is registered at
import time. A faulty plugin (it fails to import, misspells a hook, forgets ``@hookimpl``, its hook raises, or it
registers a class whose declarations are broken) is reported once by name (``Registry.failures``) and skipped, so one
broken package does not take the CLI down. A name registered by two plugins is a conflict (``Registry.conflicts``):
an error naming both, raised only where that name is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from metacore.core import hookspecs
from metacore.core.errors import RegistryError, UsageError, first_line
from metacore.core.plugin_checks import CHECKS, hook_faults, qualname

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
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (kind, name) -> plugins
    distributions: dict[str, str] = field(default_factory=dict)  # plugin name -> "dist version"

    def task(self, name: str) -> Entry:
        return self._get(self.tasks, "task", name)

    def controller(self, name: str) -> Entry:
        return self._get(self.controllers, "controller", name)

    def optimizer(self, name: str) -> Entry:
        return self._get(self.optimizers, "optimizer", name)

    def source(self, plugin: str) -> str:
        """``'plugin' (dist version)``: how messages name a plugin."""
        dist = self.distributions.get(plugin) or _builtin_dist(plugin)
        return f"{plugin!r}" + (f" ({dist})" if dist else "")

    def conflict_message(self, kind: str, name: str) -> str:
        plugins = [self.source(p) for p in self.conflicts[(kind, name)]]
        return (f"{kind} {name!r} is registered by both {' and '.join(plugins)}; uninstall one of them to use it "
                "(metacore list shows the conflict)")

    def _get(self, table: dict[str, Entry], kind: str, name: str) -> Entry:
        if (kind, name) in self.conflicts:
            raise RegistryError(self.conflict_message(kind, name))
        if name not in table:
            raise UsageError(f"unknown {kind} {name!r} (known: {', '.join(sorted(table)) or 'none'})")
        return table[name]

    def fail(self, plugin: str, reason: str) -> None:
        """Record one fault of a plugin; several faults of one plugin share its single report."""
        previous = self.failures.get(plugin)
        self.failures[plugin] = reason if not previous else f"{previous}; {reason}"


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
                pm.failures[plugin] = f"import failed: {first_line(exc, with_type=True)}"
                continue
            _register_plugin(pm, module, plugin)
        else:
            _register_plugin(pm, plugin, getattr(plugin, "__name__", None))
    if entry_points:
        _load_entry_points(pm)
    pm.check_pending()
    return pm


def _load_entry_points(pm: PluginManager) -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        if dist is not None:
            pm.distributions[ep.name] = f"{dist.metadata['Name']} {dist.version}"
        try:
            plugin = ep.load()
        except Exception as exc:
            pm.failures[ep.name] = f"import of {ep.value!r} failed: {first_line(exc, with_type=True)}"
            continue
        _register_plugin(pm, plugin, ep.name)


def _register_plugin(pm: PluginManager, plugin: Any, name: str | None) -> None:
    """Register one plugin, or leave it out with the reason if metacore would not call its hooks."""
    label = name or getattr(plugin, "__name__", None) or repr(plugin)
    try:
        pm.register(plugin, name=name)
    except Exception as exc:  # pluggy's PluginValidationError: a hook with arguments its spec does not have
        pm.failures[label] = first_line(exc, with_type=True)
        return
    fault = hook_faults(pm, plugin)
    if fault:
        pm.unregister(plugin)
        pm.failures[label] = fault


def build_registry(pm: PluginManager | None = None) -> Registry:
    """Call every plugin's registration hooks, one plugin at a time so a failure is attributed to its plugin."""
    pm = pm or get_plugin_manager()
    registry = Registry(failures=dict(pm.failures), distributions=dict(pm.distributions))
    for kind, hook, table in (
        ("task", pm.hook.metacore_register_tasks, registry.tasks),
        ("controller", pm.hook.metacore_register_controllers, registry.controllers),
        ("optimizer", pm.hook.metacore_register_optimizers, registry.optimizers),
    ):
        for impl in hook.get_hookimpls():  # registration order
            plugin_name = impl.plugin_name
            dist = pm.distributions.get(plugin_name)

            def register(obj: Any, name: str | None = None, *, _kind=kind, _table=table, _p=plugin_name, _d=dist,
                         _hook=hook.name):
                fault = _register(registry, _table, _kind, obj, name, _p, _d)
                if fault:
                    registry.fail(_p, f"{_hook}: {fault}")

            try:
                impl.function(register=register)
            except Exception as exc:
                registry.fail(plugin_name, f"{hook.name} raised {first_line(exc, with_type=True)}")
    return registry


def _register(registry: Registry, table: dict[str, Entry], kind: str, obj: Any, name: str | None, plugin: str,
              dist: str | None) -> str | None:
    """Add one class to ``table``; the fault (a string) if it is left out. Two plugins, one name: a conflict."""
    from metacore.core.controller import Controller
    from metacore.core.optimizer import Optimizer
    from metacore.core.task import Task

    base = {"task": Task, "controller": Controller, "optimizer": Optimizer}.get(kind)
    if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
        return f"registered {obj!r} as a {kind}, but it is not a {base.__name__} subclass"
    name = name or getattr(obj, "name", None)
    if not name or not isinstance(name, str):
        return f"registered {kind} {qualname(obj)} without a name"
    check = CHECKS.get(kind)
    fault = check(obj) if check else None
    if fault:
        return f"{kind} {name!r} ({qualname(obj)}): {fault}"
    if (kind, name) in registry.conflicts:
        registry.conflicts[(kind, name)].append(plugin)
        return None
    if name in table:
        registry.conflicts[(kind, name)] = [table.pop(name).plugin, plugin]
        return None
    table[name] = Entry(kind=kind, name=name, obj=obj, plugin=plugin, distribution=dist or _builtin_dist(plugin))
    return None


def _builtin_dist(plugin: str) -> str | None:
    if plugin.startswith("metacore."):
        from metacore import __version__

        return f"metacore {__version__}"
    return None


def load_registry(plugins: Iterable[Any] | None = None, *, entry_points: bool = True) -> Registry:
    return build_registry(get_plugin_manager(plugins, entry_points=entry_points))
