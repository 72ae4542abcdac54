"""The plugin hooks. They are registration-only: no per-step hooks; the trainer calls the chosen controller directly."""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "metacore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., Any]


@hookspec
def metacore_register_tasks(register: Register) -> None:
    """Call ``register(TaskClass)`` for every task the plugin provides (a :class:`metacore.Task` subclass)."""


@hookspec
def metacore_register_controllers(register: Register) -> None:
    """Call ``register(ControllerClass)`` for every controller the plugin provides (a :class:`metacore.Controller`)."""


@hookspec
def metacore_register_optimizers(register: Register) -> None:
    """Call ``register(OptimizerClass)`` for every optimizer the plugin provides (a :class:`metacore.Optimizer`)."""
