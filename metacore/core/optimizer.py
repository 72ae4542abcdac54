"""The Optimizer plugin interface: how a registered optimizer builds a ``torch.optim.Optimizer`` for any task.

A task builds its own optimizer (the seed's: SGD with momentum for cifar10, AdamW for imdb...); ``--optimizer NAME``
replaces it with a registered one. The optimizer declares the hyperparameters it exposes (param-group keys, with its
own defaults and bounds); those it marks ``inherit`` take the task's default and bounds where the task declares a
hyperparameter of the same name, so ``--set``, the task's bounds and every controller keep working. For a
learning-rate-free optimizer ``lr`` is a multiplier of the step size it estimates (default 1.0); its own knobs
(``d0``, ``growth_rate``, ``reps_rel``...) are options, set with ``--set`` like task options.

:func:`bind_optimizer` makes the task of a run use the optimizer: a subclass of the task's class whose
``hparam_space``/``build_optimizer``/``evaluate``/``optimizer_metrics`` go through the plugin, so the trainer and
the runner stay as they are.
"""

from __future__ import annotations

import contextlib
import importlib.util
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping

from metacore.core.errors import UsageError
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.options import OptionSet, OptionSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from metacore.core.task import Task, TaskContext, TaskData

DEFAULT = "default"  # --optimizer default: the task's own optimizer


class Optimizer:
    """Base class of optimizer plugins. Subclasses set the class attributes and implement :meth:`build`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # the PyPI distribution and import name it needs (checked before a run starts: a missing one names the pip install)
    requires: ClassVar[str | None] = None
    module: ClassVar[str | None] = None
    lr_free: ClassVar[bool] = False
    # "sgd" | "adam" for torch.optim.SGD / Adam / AdamW themselves; "other" for anything else (controllers use it)
    family: ClassVar[str] = "other"
    # what ``lr`` means for this optimizer, in words (shown when a controller adapts it)
    lr_meaning: ClassVar[str] = "the learning rate"
    options: ClassVar[dict[str, OptionSpec]] = {}
    # hyperparameters whose default and bounds come from the task's space when the task declares the same name
    inherit: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        self.config: dict[str, Any] = OptionSet(f"optimizer {self.name}", dict(self.options)).resolve(options)

    # --- declarations -------------------------------------------------------------------------------------------
    def hparams(self) -> list[HParamSpec]:
        """The hyperparameters it exposes, with its own defaults and bounds (``acts_on="optimizer"``)."""
        raise NotImplementedError

    @classmethod
    def check_available(cls) -> None:
        """UsageError naming the pip install when the package it needs is missing."""
        if cls.module and importlib.util.find_spec(cls.module) is None:
            dist = cls.requires or cls.module
            raise UsageError(f"optimizer {cls.name} needs the package {dist}: pip install {dist} "
                             "(or pip install 'metacore[lrfree]' for every learning-rate-free optimizer)")

    # --- building -----------------------------------------------------------------------------------------------
    def build(self, model: torch.nn.Module, hparams: Mapping[str, float], ctx: TaskContext) -> torch.optim.Optimizer:
        """A torch optimizer over ``model``'s parameters with the run's initial hyperparameters."""
        raise NotImplementedError

    # --- during the run -----------------------------------------------------------------------------------------
    def effective_lr(self, optimizer: Any) -> float | None:
        """The step size the optimizer uses now (what an LR-free one estimated), logged as ``hparam/effective_lr``;
        None when it is just ``lr``. Called at logging intervals only."""
        return None

    @contextlib.contextmanager
    def evaluation(self, optimizer: Any, model: Any, task: Task, data: TaskData, ctx: TaskContext) -> Iterator[None]:
        """Around every evaluation (e.g. Schedule-Free's switch to its averaged weights and back)."""
        yield


def optimizer_space(task_space: HParamSpace, optimizer: Optimizer, task_name: str) -> HParamSpace:
    """The run's space: the task's model and data hyperparameters, then the optimizer's (inherited where marked)."""
    specs = [s for s in task_space if s.acts_on != "optimizer"]
    taken = {s.name for s in specs}
    for spec in optimizer.hparams():
        if spec.name in taken:
            raise UsageError(f"optimizer {optimizer.name} declares {spec.name!r}, which task {task_name} uses for "
                             "something other than the optimizer")
        own = task_space.specs.get(spec.name)
        if spec.name in optimizer.inherit and own is not None and own.acts_on == "optimizer":
            spec = HParamSpec(spec.name, own.default, own.low, own.high, log=own.log, group_key=spec.group_key,
                              index=spec.index, integer=spec.integer, help=spec.help or own.help)
        specs.append(spec)
    return HParamSpace(specs, owner=f"task {task_name} with optimizer {optimizer.name}")


def dropped_hparams(task_space: HParamSpace, space: HParamSpace) -> list[str]:
    """The task's optimizer hyperparameters that the chosen optimizer does not take."""
    return [s.name for s in task_space if s.acts_on == "optimizer" and s.name not in space]


def bind_optimizer(task: Task, optimizer: Optimizer) -> Task:
    """The task, building ``optimizer`` instead of its own (a subclass of its class, its instance state copied)."""
    base = type(task)
    space = optimizer_space(task.hparam_space(), optimizer, task.name)
    built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its optimizer

    def hparam_space(self) -> HParamSpace:
        return space

    def build_optimizer(self, model, hparams, ctx):
        opt = optimizer.build(model, hparams, ctx)
        built[model] = opt
        return opt

    def evaluate(self, model, data, split, ctx):
        opt = built.get(model)
        if opt is None:
            return base.evaluate(self, model, data, split, ctx)
        with optimizer.evaluation(opt, model, self, data, ctx):
            return base.evaluate(self, model, data, split, ctx)

    def optimizer_metrics(self, opt) -> dict[str, float]:
        value = optimizer.effective_lr(opt)
        return {} if value is None else {"hparam/effective_lr": float(value)}

    bound = type(base.__name__, (base,), {
        "__module__": base.__module__, "__qualname__": base.__qualname__, "hparam_space": hparam_space,
        "build_optimizer": build_optimizer, "evaluate": evaluate, "optimizer_metrics": optimizer_metrics,
        "optimizer_plugin": optimizer})
    out = bound.__new__(bound)
    out.__dict__.update(task.__dict__)
    return out


def optimizer_params(optimizer: Optimizer | None) -> dict[str, Any]:
    """MLflow params of a child run: the optimizer's name (``default``: the task's own) and its options."""
    if optimizer is None:
        return {"optimizer": DEFAULT}
    return {"optimizer": optimizer.name, "optimizer.lr_free": optimizer.lr_free,
            **{f"optimizer.{k}": v for k, v in optimizer.config.items()}}


def select_optimizer(registry: Any, task: Task, name: str | None,
                     sets: Mapping[str, str]) -> tuple[Task, Optimizer | None, dict[str, str]]:
    """The run's task (bound to the chosen optimizer), the optimizer plugin, and the ``--set`` values left for the
    task (the optimizer's own options taken out). Every error names the task and the optimizer."""
    if name in (None, "", DEFAULT):
        return task, None, dict(sets)
    entry = registry.optimizer(name)
    cls = entry.obj
    if task.optimizers is not None and cls.name not in task.optimizers:
        raise UsageError(f"task {task.name} cannot train with optimizer {cls.name} "
                         f"(it takes: {', '.join(task.optimizers) or 'only its own'})")
    cls.check_available()
    task_space, task_options = task.hparam_space(), task.option_specs()
    opt_given = {k: v for k, v in sets.items() if k in cls.options and k not in task_space and k not in task_options}
    optimizer = cls(**opt_given)
    bound = bind_optimizer(task, optimizer)
    space = bound.hparam_space()
    for key in sets:
        if key in dropped_hparams(task_space, space):
            raise UsageError(f"optimizer {cls.name} does not take {key!r}, a hyperparameter of task {task.name} "
                             f"(optimizer {cls.name} takes: {', '.join(s.name for s in optimizer.hparams())}; "
                             f"options: {', '.join(cls.options) or 'none'})")
    return bound, optimizer, {k: v for k, v in sets.items() if k not in opt_given}


def check_build(optimizer: Optimizer, hparams: Mapping[str, float], ctx: TaskContext) -> None:
    """Build the optimizer once on a tiny model, so a value its package rejects stops the run before it starts."""
    import torch

    optimizer.build(torch.nn.Linear(2, 2), hparams, ctx)


def controller_notes(optimizer: Optimizer | None, roles: list, space: HParamSpace) -> list[str]:
    """What each controller adapts on top of a chosen optimizer; a controller that cannot work with it refuses
    here (``check_optimizer`` raising UsageError), before anything is written."""
    if optimizer is None:
        return []
    notes = []
    for _role, name, cls, config in roles:
        check = getattr(cls, "check_optimizer", None)
        if check:
            note = check(cls(**config), optimizer, space)
        elif optimizer.lr_free and name != "static":
            note = f"changes the hyperparameters it controls; lr is {optimizer.lr_meaning}"
        else:
            note = None
        if note:
            notes.append(f"controller {name} on optimizer {optimizer.name}: {note}")
    return notes
