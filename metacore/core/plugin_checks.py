"""What makes a plugin faulty, found when it is registered, so it can be named and skipped instead of failing later.

Each check returns a one-line description of the fault (which hook or class, what is wrong) or None. The registry
reports it once, with the plugin and its distribution, and leaves the faulty plugin or class out; every other task
and controller keeps working.
"""

from __future__ import annotations

import difflib
from typing import Any

from metacore.core.errors import first_line as _first_line
from metacore.core.options import OptionSpec


def first_line(exc: BaseException) -> str:
    return _first_line(exc, with_type=True)

PREFIX = "metacore_"


def qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def hook_faults(pm: Any, plugin: Any) -> str | None:
    """A registered plugin whose hooks metacore will not call: misspelt names, or functions without ``@hookimpl``."""
    known = sorted(name for name in vars(pm.hook) if not name.startswith("_") and pm.hook.__dict__[name].has_spec())
    callers = pm.get_hookcallers(plugin) or []
    unknown = sorted(hc.name for hc in callers if not hc.has_spec())
    if unknown:
        parts = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return f"unknown hook {', '.join(parts)}; metacore's hooks are {', '.join(known)}"
    if callers:
        return None
    undecorated = sorted(n for n in dir(plugin) if n.startswith(PREFIX) and callable(getattr(plugin, n, None)))
    if undecorated:
        return (f"{', '.join(undecorated)} {'is' if len(undecorated) == 1 else 'are'} not decorated with "
                "@metacore.hookimpl, so metacore never calls it")
    return f"implements no metacore hook (expected one of {', '.join(known)}, decorated with @metacore.hookimpl)"


def _option_faults(specs: Any, where: str) -> str | None:
    if not isinstance(specs, dict):
        return f"{where} must be a dict of OptionSpec, got {type(specs).__name__}"
    for key, spec in specs.items():
        if not isinstance(spec, OptionSpec):
            return f"{where}[{key!r}] is not an OptionSpec"
        if spec.default is None:
            continue
        try:
            spec.parse(spec.default)
        except Exception as exc:  # a default its own spec refuses
            return f"{where}[{key!r}]: default {spec.default!r} is refused by its own spec ({exc})"
    return None


def task_faults(cls: type) -> str | None:
    """Instantiate the task and read its declarations (what ``metacore list`` and every ``run`` do)."""
    try:
        task = cls()
    except Exception as exc:
        return f"{cls.__name__}() failed: {first_line(exc)}"
    for method in ("hparam_space", "presets", "option_specs"):
        try:
            value = getattr(task, method)()
        except Exception as exc:
            return f"{method}() failed: {first_line(exc)}"
        if method == "presets" and (not isinstance(value, dict) or not value):
            return "presets() must return a non-empty dict of Preset"
        if method == "option_specs" and (fault := _option_faults(value, "option_specs()")):
            return fault
    metrics = getattr(task, "metrics", {})
    if task.primary_metric not in metrics:
        return f"primary_metric {task.primary_metric!r} is not one of its metrics ({', '.join(metrics) or 'none'})"
    bad = {k: v for k, v in metrics.items() if v not in ("max", "min")}
    if bad:
        return f"metrics must map each name to 'max' or 'min', got {bad}"
    return None


def controller_faults(cls: type) -> str | None:
    """The controller's declared options (its constructor runs only when a run asks for it)."""
    return _option_faults(getattr(cls, "options", {}), "options")


CHECKS = {"task": task_faults, "controller": controller_faults}
