"""The ``metacore`` command. Thin: parse, then hand over to the command module (``metacore.commands.*``).

No torch, mlflow, transformers or stable-baselines3 import at module level, so ``--help`` and ``list`` are fast.
Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback), 1 unexpected failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from metacore.commands import COMMANDS
from metacore.core.errors import MetacoreError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every bad input is one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from metacore import __version__

    parser = _Parser(prog="metacore", description="Tune hyperparameters while a model trains; compare with a "
                     "static baseline in MLflow.")
    parser.add_argument("--version", action="version", version=f"metacore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    handlers = {}
    for path in COMMANDS:
        module = importlib.import_module(path)
        module.add_parser(sub)
        handlers[module.NAME] = module.main
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    try:
        parser, handlers = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return handlers[args.command](args)
    except MetacoreError as exc:
        print(f"metacore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metacore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``metacore list --json | head``): end quietly
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
