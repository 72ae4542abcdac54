"""Small pieces shared by the command modules."""

from __future__ import annotations

import sys
from typing import Any


def report_failures(failures: Any) -> None:
    """Faulty plugins are named once each on stderr, with their distribution; the command goes on without them.

    ``failures`` is a :class:`~metacore.core.registry.Registry` (its failures, named with their distributions) or
    a plain ``{plugin: reason}`` dict.
    """
    source = getattr(failures, "source", None)
    items = getattr(failures, "failures", failures)
    for name, reason in items.items():
        where = source(name) if source else repr(name)
        print(f"metacore: warning: plugin {where} was skipped: {reason}", file=sys.stderr)


def optimizer_rows(registry) -> list[dict]:
    """``metacore list`` rows of the registered optimizers (whether the package each needs is installed)."""
    import importlib.util

    rows = []
    for e in registry.optimizers.values():
        cls = e.obj
        rows.append({"name": e.name, "description": e.description, "plugin": e.plugin,
                     "distribution": e.distribution, "lr_free": cls.lr_free, "requires": cls.requires,
                     "available": not cls.module or importlib.util.find_spec(cls.module) is not None,
                     "hparams": {s.name: s.default for s in cls().hparams()}, "lr": cls.lr_meaning,
                     "options": {k: s.default for k, s in cls.options.items()}})
    return rows
