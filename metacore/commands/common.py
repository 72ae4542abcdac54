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
