"""``metacore list``: registered tasks, controllers and optimizers, and the plugin each came from."""

from __future__ import annotations

import argparse
import json
from typing import Any

from metacore.commands.common import report_failures

NAME = "list"


def add_parser(sub: Any) -> None:
    lst = sub.add_parser(NAME, help="registered tasks, controllers and optimizers, and where each came from")
    lst.add_argument("what", nargs="?", choices=["tasks", "controllers", "optimizers"],
                     help="only tasks, controllers or optimizers")
    lst.add_argument("--json", action="store_true", help="print JSON")


def main(args: argparse.Namespace) -> int:
    from metacore.core.registry import load_registry

    registry = load_registry()
    report_failures(registry)
    out: dict[str, Any] = {}
    if args.what in (None, "tasks"):
        out["tasks"] = []
        for entry in registry.tasks.values():
            task = entry.obj()
            out["tasks"].append({
                "name": entry.name, "description": entry.description, "plugin": entry.plugin,
                "distribution": entry.distribution, "presets": list(task.presets()),
                "hparams": task.hparam_space().defaults(),
                "options": {k: s.default for k, s in task.option_specs().items()},
                "primary_metric": task.primary_metric})
    if args.what in (None, "controllers"):
        out["controllers"] = [{"name": e.name, "description": e.description, "plugin": e.plugin,
                               "distribution": e.distribution,
                               "options": {k: s.default for k, s in e.obj.options.items()}}
                              for e in registry.controllers.values()]
    if args.what in (None, "optimizers"):
        from metacore.commands.common import optimizer_rows

        out["optimizers"] = optimizer_rows(registry)
    conflicts = [{"kind": kind, "name": name, "plugins": plugins, "message": registry.conflict_message(kind, name)}
                 for (kind, name), plugins in registry.conflicts.items() if args.what in (None, f"{kind}s")]
    if conflicts:  # present only when there are some, so the usual shape stays as it was
        out["conflicts"] = conflicts
    if registry.failures:
        out["failures"] = [{"plugin": p, "distribution": registry.distributions.get(p), "reason": r}
                           for p, r in registry.failures.items()]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for kind in ("tasks", "controllers", "optimizers"):
        if kind not in out:
            continue
        print(f"{kind}:")
        for item in out[kind]:
            extra = f"  presets: {', '.join(item['presets'])}" if kind == "tasks" else ""
            if kind == "optimizers" and not item["available"]:
                extra = f"  (not installed: pip install {item['requires']})"
            print(f"  {item['name']:<16} {item['description']}")
            print(f"  {'':<16} from {item['plugin']} ({item['distribution'] or 'unknown distribution'}){extra}")
    if conflicts:
        print("conflicts (unusable until one of the plugins is uninstalled):")
        for c in conflicts:
            print(f"  {c['name']:<16} {c['kind']} registered by {', '.join(map(registry.source, c['plugins']))}")
    return 0
