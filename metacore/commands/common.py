"""Small pieces shared by the command modules."""

from __future__ import annotations

import sys


def report_failures(failures: dict[str, str]) -> None:
    """Plugins that failed to load are named on stderr; the command goes on without them."""
    for name, reason in failures.items():
        print(f"metacore: warning: plugin {name!r} failed to load and was skipped ({reason})", file=sys.stderr)


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
