"""One module per CLI command, each with ``NAME``, ``add_parser(subparsers)`` and ``main(args) -> exit code``.

A new command is a new module here plus one line in :data:`COMMANDS`; modules are imported when the parser is built,
so they must import nothing heavy at module level.
"""

COMMANDS: tuple[str, ...] = (
    "metacore.commands.run",
    "metacore.commands.list",
    "metacore.commands.compare",
    "metacore.commands.bench",
    "metacore.commands.tune",
    "metacore.commands.meta_train",
)
