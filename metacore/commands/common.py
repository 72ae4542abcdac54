"""Small pieces shared by the command modules."""

from __future__ import annotations

import sys


def report_failures(failures: dict[str, str]) -> None:
    """Plugins that failed to load are named on stderr; the command goes on without them."""
    for name, reason in failures.items():
        print(f"metacore: warning: plugin {name!r} failed to load and was skipped ({reason})", file=sys.stderr)
