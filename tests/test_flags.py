"""Each CLI flag is declared once (metacore/commands/flags.py): the parser, the RunRequest and the docs agree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from metacore.app.runner import RunRequest
from metacore.cli import build_parser
from metacore.commands import flags

ROOT = Path(__file__).resolve().parents[1]


def _run_parser():
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices["run"]


def test_docs_cli_md_is_generated_from_the_parser():
    parser, _ = build_parser()
    assert (ROOT / "docs" / "cli.md").read_text() == flags.markdown(parser), (
        "docs/cli.md is stale: python -m metacore.commands.flags > docs/cli.md")


def test_run_flags_fill_the_run_request_and_share_its_defaults():
    _, run = _run_parser()
    fields = {f.name: f for f in dataclasses.fields(RunRequest)}
    for flag in flags.RUN:
        if flag.field is None:
            continue
        assert flag.field in fields, f"{flag.name} fills no RunRequest field {flag.field!r}"
        if flag.default is not None:
            assert flag.default == fields[flag.field].default, flag.name
    assert {f.field for f in flags.RUN if f.field} == set(fields), "a RunRequest field no run flag fills"
    args = run.parse_args(["--task", "digits", "--controller", "hypergrad", "--set", "lr=0.1", "--seeds", "2"])
    req = flags.request_fields(args, flags.RUN)
    assert req["sets"] == {"lr": "0.1"} and req["seeds"] == 2 and req["preset"] == RunRequest.preset


def test_readme_names_every_run_flag():
    _, run = _run_parser()
    readme = (ROOT / "README.md").read_text()
    for action in run._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert f"`{option}" in readme, f"README.md does not mention {option}"
