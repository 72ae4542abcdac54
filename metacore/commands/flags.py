"""Every command-line flag, declared once: the parser, the ``RunRequest`` and the generated docs come from here.

A :class:`Flag` holds what argparse needs and, for ``metacore run``, the :class:`~metacore.app.runner.RunRequest`
field it fills (``field``); a command adds the flags it takes with :func:`add`, a flag that means something slightly
different in a command (another default or help) is the same flag ``.but(...)``. ``docs/cli.md`` is written from
the parser (``python -m metacore.commands.flags > docs/cli.md``) and a test checks it is current.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from metacore.app.request import PRECISIONS, RunRequest
from metacore.core.options import parse_assignments


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    action: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    dest: str | None = None
    required: bool = False
    field: str | None = None  # the RunRequest field this flag fills
    assignments: bool = False  # KEY=VALUE items, repeatable, parsed into a dict
    group: str | None = None  # flags of one group exclude each other

    @property
    def key(self) -> str:
        """The attribute on the parsed namespace."""
        return self.dest or self.name.lstrip("-").replace("-", "_")

    def but(self, **changes: Any) -> Flag:
        """The same flag with another default, help or requirement in one command."""
        return replace(self, **changes)

    def add_to(self, parser: Any) -> None:
        kwargs: dict[str, Any] = {"help": self.help, "dest": self.key}
        if self.assignments:
            kwargs.update(action="append", metavar=self.metavar or "KEY=VALUE")
        elif self.action:
            kwargs["action"] = self.action
        else:
            kwargs.update(type=self.type, default=self.default, choices=self.choices, metavar=self.metavar)
        if self.required:
            kwargs["required"] = True
        parser.add_argument(self.name, **{k: v for k, v in kwargs.items() if v is not None})

    def value(self, args: argparse.Namespace) -> Any:
        raw = getattr(args, self.key)
        return parse_assignments(raw, self.name) if self.assignments else raw


def add(parser: Any, flags: Iterable[Flag]) -> None:
    """Add ``flags`` to ``parser``; flags sharing a ``group`` go into one mutually exclusive group."""
    groups: dict[str, Any] = {}
    for flag in flags:
        target = parser
        if flag.group:
            if flag.group not in groups:
                groups[flag.group] = parser.add_mutually_exclusive_group()
            target = groups[flag.group]
        flag.add_to(target)


def request_fields(args: argparse.Namespace, flags: Iterable[Flag]) -> dict[str, Any]:
    """The ``RunRequest`` fields the parsed ``flags`` fill, by field name."""
    return {f.field: f.value(args) for f in flags if f.field}


def _default(field: str) -> Any:
    """The programmatic default of a ``RunRequest`` field, so the command line and the API cannot drift apart."""
    return next(f.default for f in dataclasses.fields(RunRequest) if f.name == field)


# ---------------------------------------------------------------------------------------------------- shared flags
TASK = Flag("--task", "a registered task (metacore list tasks); required unless --resume", field="task")
CONTROLLER = Flag("--controller", "a registered controller; static keeps the initial values; required unless "
                  "--resume", field="controller")
OPTIMIZER = Flag("--optimizer", "a registered optimizer (metacore list optimizers) for every run; default: the "
                 "task's own; its options go in --set", field="optimizer")
BASELINE = Flag("--baseline", "controller run beside it (default: the task's, usually static); 'none' for no "
                "baseline", field="baseline")
PRESET = Flag("--preset", "task scale: full, small or smoke (default %(default)s)", default=_default("preset"),
              field="preset")
STEPS = Flag("--steps", "budget in optimizer steps (overrides the preset)", type=int, group="budget", field="steps")
EPOCHS = Flag("--epochs", "budget in epochs (overrides the preset)", type=float, group="budget", field="epochs")
SEED = Flag("--seed", "first seed (default %(default)s)", type=int, default=_default("seed"), field="seed")
SEEDS = Flag("--seeds", "number of seeds (default %(default)s)", type=int, default=_default("seeds"), field="seeds")
SET = Flag("--set", "initial hyperparameter or task option, e.g. --set lr=0.1 (repeatable)", dest="sets",
           assignments=True, field="sets")
CONTROLLER_SET = Flag("--controller-set", "controller option, e.g. --controller-set hyper_lr=1e-3 (repeatable)",
                      dest="controller_sets", assignments=True, field="controller_sets")
DATA_DIR = Flag("--data-dir", "local data root (also METACORE_DATA_DIR)", field="data_dir")
TRACKING_URI = Flag("--tracking-uri", "MLflow store (default sqlite:///mlflow_runs/mlflow.db; also "
                    "MLFLOW_TRACKING_URI)", field="tracking_uri")
EXPERIMENT = Flag("--experiment", "MLflow experiment (default: the task name)", field="experiment")
DEVICE = Flag("--device", "auto, cpu or cuda (default %(default)s)", default=_default("device"), field="device")
PRECISION = Flag("--precision", "auto: bf16 autocast on CUDA for tasks that declare it safe (default); fp32: never",
                 default=_default("precision"), choices=PRECISIONS, field="precision")
COMPILE = Flag("--compile", "torch.compile the model for training (GPU fast path)", action="store_true",
               field="compile")
CHECKPOINT_INTERVAL = Flag("--checkpoint-interval", "steps between checkpoints (default: the preset's)", type=int,
                           field="checkpoint_interval")
CHECKPOINT_DIR = Flag("--checkpoint-dir", "where checkpoints go (default mlflow_runs/checkpoints/<run_id>/)",
                      field="checkpoint_dir")
RESUME = Flag("--resume", "continue an interrupted run (its parent run id) from its newest intact checkpoints, with "
              "its original options", metavar="RUN_ID")
JSON = Flag("--json", "print one JSON object on stdout and nothing else", action="store_true")
# Ray (bench --backend ray, tune)
ADDRESS = Flag("--address", "Ray cluster to join (HOST:PORT of `ray start --head`, or auto; default: a local Ray "
               "instance)")
CPUS = Flag("--cpus-per-unit", "CPUs Ray reserves per unit, also its torch threads (default %(default)s)",
            type=float, default=1.0)
GPUS = Flag("--gpus-per-unit", "GPUs Ray reserves per unit (default %(default)s)", type=float, default=0.0)
THREADS = Flag("--threads", "torch CPU threads (default auto: the cores not already busy, at least 1; also "
               "METACORE_THREADS)", metavar="N|auto")

RUN = (TASK, CONTROLLER, OPTIMIZER, BASELINE, PRESET, STEPS, EPOCHS, SEED, SEEDS, SET, CONTROLLER_SET, DATA_DIR,
       TRACKING_URI, EXPERIMENT, DEVICE, PRECISION, COMPILE, CHECKPOINT_INTERVAL, CHECKPOINT_DIR, RESUME, THREADS,
       JSON.but(help="print one JSON summary on stdout and nothing else"))


# ---------------------------------------------------------------------------------------------------- docs
def markdown(parser: argparse.ArgumentParser) -> str:
    """``docs/cli.md``: every command's flags, from the parser itself."""
    out = ["# Command-line reference", "",
           "Generated from `metacore/commands/flags.py` and the command modules by "
           "`python -m metacore.commands.flags > docs/cli.md` (a test checks it is current). "
           "Exit codes: 0 ok, 2 bad input, 1 unexpected failure, 130 interrupted.", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, command in sub.choices.items():
        out += [f"## metacore {name}", "", helps.get(name) or "", "", "| flag | default | meaning |",
                "| --- | --- | --- |"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(action.option_strings) or action.dest
            if action.nargs == 0:
                default = ""
            else:
                flag += f" {action.metavar or action.dest.upper()}" if action.option_strings else ""
                default = "" if action.default in (None, argparse.SUPPRESS) else f"`{action.default}`"
            text = (action.help or "") % {"default": action.default, "prog": command.prog}
            if action.choices:
                text += f" (one of: {', '.join(map(str, action.choices))})"
            text = text.replace("|", "/").replace("<", "&lt;").replace(">", "&gt;")
            out.append(f"| `{flag}` | {default} | {text} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    from metacore.cli import build_parser

    print(markdown(build_parser()[0]), end="")
