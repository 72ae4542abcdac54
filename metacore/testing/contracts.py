"""Contract test cases for plugin authors, and running a controller on a tiny task (see :mod:`metacore.testing`).

This module imports ``pytest`` (it is used from test suites only) and imports ``torch`` inside its functions.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any, Callable, Mapping

import pytest

from metacore.core.controller import Controller, StepContext
from metacore.core.errors import DataError, UsageError
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.options import OptionSpec
from metacore.core.registry import Registry
from metacore.core.task import Preset, Task, TaskContext, TaskData
from metacore.core.values import floats, to_float
from metacore.testing.tiny import TinyAdamTask, TinyTask


# ---------------------------------------------------------------------------------------------------- running
def task_context(task: Task, preset: str = "smoke", seed: int = 0, data_dir: Any = None,
                 hparams: Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None) -> TaskContext:
    """A :class:`TaskContext` at a preset, with the task's default hyperparameters (overridden by ``hparams``)."""
    from pathlib import Path

    p = task.preset(preset)
    values = task.hparam_space().resolve(dict(hparams or {}))
    return TaskContext(p, task.resolve_options(p, dict(options or {})), seed, "cpu",
                       Path(data_dir) if data_dir else None, values)


def run_controller(controller: Controller, task: Task | None = None, *, steps: int | None = None, seed: int = 0,
                   hparams: Mapping[str, Any] | None = None, data: TaskData | None = None, data_dir: Any = None,
                   tracker: Any = None, log_interval: int | None = None, eval_interval: int | None = None,
                   stop_after: int | None = None, threads: int | None = 1,
                   on_proposal: Callable[[Mapping[str, Any]], None] | None = None):
    """Train ``task`` (default :class:`TinyTask`) at its smoke preset with ``controller`` on the CPU.

    It trains on ``threads`` torch threads (restored afterwards; ``None``: torch's default): a small model gains
    little from threads and loses much when test processes share the cores.

    Returns ``(trainer, result)``; metrics go to ``tracker`` (an in-memory one by default: ``trainer.tracker``).
    With ``stop_after`` the run stops after that many of its ``steps`` and ``result`` is None (the run is not over).
    ``on_proposal`` sees every raw ``act()`` proposal before it is checked against the space (see
    :func:`check_proposal`).
    """
    from metacore.core.tracking import MemoryTracker
    from metacore.core.trainer import Trainer, TrainerConfig

    task = task or TinyTask()
    ctx = task_context(task, "smoke", seed, data_dir, hparams)
    tracker = tracker or MemoryTracker()
    run_id = tracker.start_run(task.name, controller.name or "controller")
    budget = steps or ctx.preset.steps
    config = TrainerConfig(budget=budget, log_interval=log_interval or ctx.preset.log_interval,
                           eval_interval=eval_interval or ctx.preset.eval_interval)
    with _threads(threads):
        trainer = Trainer(task, controller, ctx, ctx.hparams, config, data=data, tracker=tracker, run_id=run_id,
                          on_proposal=on_proposal)
        if stop_after is not None:
            trainer.advance(stop_after)
            return trainer, None
        return trainer, trainer.run()


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with ``n`` torch threads: a tiny model gains nothing from threads and loses much to contention."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def step_context(trainer: Any) -> StepContext:
    """Forward and backward one training batch of ``trainer`` and the :class:`StepContext` an observer would get."""
    trainer.compute_gradients()
    return trainer.driver.step_context(trainer.step)


def check_proposal(controller: str, space: HParamSpace, changes: Any) -> None:
    """Assert that one raw ``act()`` proposal is what the interface allows: a mapping of declared names to finite
    numbers (or 0-dim tensors) inside the declared bounds. The message names the controller.

    The trainer would clip an out-of-bounds value and reject a non-finite one; this checks the controller itself.
    """
    who = f"controller {controller!r}: act()"
    assert isinstance(changes, Mapping), f"{who} must return a mapping, got {type(changes).__name__}"
    for name, value in changes.items():
        assert name in space, (f"{who} proposed {name!r}, which the task does not declare "
                               f"(it declares: {', '.join(space.names())})")
        tensor = getattr(value, "ndim", None) == 0 and hasattr(value, "dtype") and not value.dtype.is_complex
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        assert number or tensor, f"{who} proposed {name}={value!r}: not a number or 0-dim tensor"
        v = to_float(value)
        assert math.isfinite(v), f"{who} proposed non-finite {name}={v}"
        spec = space[name]
        slack = _tensor_slack(value, spec)
        assert spec.low - slack <= v <= spec.high + slack, (
            f"{who} proposed {name}={v:g}, outside the declared bounds [{spec.low:g}, {spec.high:g}]")


def _tensor_slack(value: Any, spec: HParamSpec) -> float:
    """A tensor clamped to a bound in its own precision may round just past the (float64) bound."""
    import torch

    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        return 0.0
    return float(torch.finfo(value.dtype).eps) * max(abs(spec.low), abs(spec.high))


def is_plain(value: Any) -> bool:
    """Tensors and plain values only (what ``torch.load(weights_only=True)`` reads back)."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and is_plain(v) for k, v in value.items())
    return False


def _weights_only_copy(state: Any) -> Any:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------------------------------- contracts
class ControllerContract:
    """The contract every controller meets. Subclass and override the ``controller_class`` fixture.

    Override ``controller_options`` to test with non-default options, and ``contract_task`` to run on your own
    task instead of the two tiny ones.
    """

    steps = 24

    @pytest.fixture
    def controller_class(self) -> type[Controller]:
        raise NotImplementedError("override the controller_class fixture to return your Controller subclass")

    @pytest.fixture
    def controller_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture(params=["sgd", "adam"])
    def contract_task(self, request) -> Task:
        return TinyTask() if request.param == "sgd" else TinyAdamTask()

    @pytest.fixture
    def make_controller(self, controller_class, controller_options):
        return lambda: controller_class(**controller_options)

    # -- declaration
    def test_declares_name_description_and_options(self, controller_class):
        assert issubclass(controller_class, Controller)
        assert isinstance(controller_class.name, str) and controller_class.name.strip()
        assert isinstance(controller_class.description, str)
        for key, spec in controller_class.options.items():
            assert isinstance(spec, OptionSpec) and spec.name == key
            assert spec.parse(spec.default) == spec.default, f"option {key}: its default does not parse"

    def test_rejects_an_unknown_option(self, controller_class):
        with pytest.raises(UsageError):
            controller_class(no_such_option_xyz=1)

    # -- behaviour in the training loop
    def test_trains_within_bounds(self, make_controller, contract_task):
        controller = make_controller()
        space = contract_task.hparam_space()
        seen: list[Any] = []

        def check(changes):  # every raw proposal, before the trainer clips or rejects anything
            check_proposal(controller.name, space, changes)
            seen.append(changes)

        trainer, result = run_controller(controller, contract_task, steps=self.steps, on_proposal=check)
        assert result.steps == self.steps and not result.diverged
        assert len(seen) == self.steps, f"controller {controller.name!r}: act() must be called once per step"
        for name, value in result.hparams_final.items():
            spec = space[name]
            assert math.isfinite(value) and spec.low <= value <= spec.high, (name, value)
        for key, value in controller.diagnostics().items():
            assert isinstance(key, str) and math.isfinite(to_float(value)), (key, value)
        for spec in space:
            history = trainer.tracker.history(trainer.run_id, f"hparam/{spec.name}")
            assert history and all(spec.low <= v <= spec.high for _, v in history), f"hparam/{spec.name} left bounds"

    def test_same_seed_same_trajectory(self, make_controller, contract_task):
        _, a = run_controller(make_controller(), contract_task, steps=12, seed=3)
        _, b = run_controller(make_controller(), contract_task, steps=12, seed=3)
        assert a.hparams_final == b.hparams_final
        assert a.final == b.final

    # -- state
    def test_state_dict_is_plain_and_loads_weights_only(self, make_controller, contract_task):
        controller = make_controller()
        run_controller(controller, contract_task, steps=8)
        state = controller.state_dict()
        assert isinstance(state, dict) and is_plain(state), "state_dict() may hold tensors and plain values only"
        restored = _weights_only_copy(state)
        fresh = make_controller()
        space = contract_task.hparam_space()
        fresh.reset(space.defaults(), 0, space, 8)
        fresh.load_state_dict(restored)

    def test_state_dict_round_trip_reproduces_the_next_action(self, make_controller, contract_task):
        import torch

        controller = make_controller()
        trainer, _ = run_controller(controller, contract_task, steps=20, stop_after=10)
        clone = make_controller()
        clone.reset(dict(trainer.ctx.hparams), trainer.ctx.seed, trainer.space, trainer.config.budget)
        clone.load_state_dict(_weights_only_copy(copy.deepcopy(controller.state_dict())))
        actions = []
        for c in (controller, clone):
            probe = trainer.driver.sibling(c)  # the same point of the run, writing nothing
            trainer.compute_gradients()
            grads = [p.grad.clone() for p in trainer.params if p.grad is not None]
            torch.manual_seed(1234)
            actions.append(floats(probe.before_optimizer_step(trainer.step, epoch=trainer.epoch_float,
                                                              budget=trainer.config.budget)))
            after = [p.grad for p in trainer.params if p.grad is not None]
            for g, before in zip(after, grads, strict=True):
                assert torch.equal(g, before), f"controller {c.name!r}: observe_gradients() modified the gradients"
        assert actions[0] == actions[1], "a controller restored from state_dict() must take the same next action"

    def test_rollback_then_act(self, make_controller, contract_task):
        controller = make_controller()
        trainer, _ = run_controller(controller, contract_task, steps=6)
        hparams = floats(trainer.hparams)
        hparams["lr"] = trainer.space["lr"].clip(hparams["lr"] * 0.5)
        probe = trainer.driver.sibling(controller, on_proposal=lambda raw: check_proposal(
            controller.name, trainer.space, raw))
        probe.rollback(hparams)
        trainer.compute_gradients()
        changes = probe.before_optimizer_step(trainer.step, epoch=trainer.epoch_float, budget=trainer.config.budget)
        assert all(math.isfinite(to_float(v)) for v in changes.values())


class TaskContract:
    """The contract every task meets. Subclass and override the ``task`` fixture (and ``data_dir`` if it needs data).

    A task whose data are missing raises :class:`~metacore.core.errors.DataError`; the data-dependent tests then
    skip. Data and the built model are made once per task and test class.
    """

    preset = "smoke"
    train_steps = 3

    @pytest.fixture
    def task(self) -> Task:
        raise NotImplementedError("override the task fixture to return an instance of your Task")

    @pytest.fixture
    def data_dir(self):
        return None

    @pytest.fixture
    def task_data(self, task, data_dir, request):
        """``(ctx, data)`` at the smoke preset, cached per test class; skips when the task's data are absent."""
        return self.load_task_data(task, data_dir, request)

    def load_task_data(self, task, data_dir, request):
        cache = request.cls.__dict__.get("_data_cache")
        if cache is None:
            cache = {}
            request.cls._data_cache = cache
        key = (type(task), str(data_dir))
        if key not in cache:
            ctx = task_context(task, self.preset, 0, data_dir)
            try:
                cache[key] = (ctx, task.load_data(ctx))
            except DataError as exc:
                cache[key] = exc
        if isinstance(cache[key], DataError):
            pytest.skip(f"data for task {task.name} not available: {cache[key]}")
        return cache[key]

    # -- declaration
    def test_declares_metrics_and_presets(self, task):
        assert isinstance(task, Task)
        assert isinstance(task.name, str) and task.name.strip()
        assert task.metrics and all(d in ("max", "min") for d in task.metrics.values())
        assert task.primary_metric in task.metrics
        assert isinstance(task.default_baseline, str) and task.default_baseline
        presets = task.presets()
        assert "smoke" in presets, "a task declares a 'smoke' preset for tests"
        for name, p in presets.items():
            assert isinstance(p, Preset) and p.name == name
            assert p.steps >= 1 and p.eval_interval >= 1 and p.log_interval >= 1 and p.checkpoint_interval >= 0
            task.resolve_options(p, {})  # a preset's options are valid task options

    def test_hparam_space_is_well_formed(self, task):
        space = task.hparam_space()
        assert isinstance(space, HParamSpace) and space.names()
        for spec in space:
            assert spec.acts_on in ("optimizer", "model", "data")
            assert spec.check(spec.default) == spec.default
        with pytest.raises(UsageError):
            space.validate({"no_such_hparam_xyz": 1})

    # -- building and training
    def test_data_splits(self, task_data):
        _, data = task_data
        for split in ("train", "val", "test"):
            tensors = data.split(split)
            assert isinstance(tensors, tuple) and len(tensors) >= 2, f"{split}: a tuple of tensors (inputs, targets)"
            sizes = {int(t.shape[0]) for t in tensors}
            assert len(sizes) == 1 and sizes.pop() > 0, f"{split}: tensors disagree on the number of examples"
        for key, value in data.info.items():
            assert isinstance(key, str) and isinstance(value, (str, int, float, bool)), (key, value)

    def test_optimizer_exposes_every_optimizer_hparam(self, task, task_data):
        import torch

        ctx, data = task_data
        torch.manual_seed(0)
        model = task.build_model(data, ctx)
        optimizer = task.build_optimizer(model, ctx.hparams, ctx)
        for spec in task.hparam_space():
            if spec.acts_on == "optimizer":
                assert any(spec.key in g for g in optimizer.param_groups), (
                    f"hyperparameter {spec.name} writes param-group key {spec.key!r}, which no group has")
            elif spec.acts_on == "model":
                task.apply_model_hparam(model, spec.name, spec.default)

    def test_trains_and_evaluates(self, task, task_data):
        from metacore.controllers.static import StaticController
        from metacore.core.tracking import MemoryTracker
        from metacore.core.trainer import Trainer, TrainerConfig

        ctx, data = task_data
        tracker = MemoryTracker()
        run_id = tracker.start_run(task.name, "contract")
        config = TrainerConfig(budget=self.train_steps, log_interval=1, eval_interval=10**9)
        trainer = Trainer(task, StaticController(), ctx, ctx.hparams, config, data=data, tracker=tracker,
                          run_id=run_id)
        trainer.advance(self.train_steps)
        losses = [v for _, v in tracker.history(run_id, "train/loss")]
        assert len(losses) == self.train_steps and all(math.isfinite(v) for v in losses)
        metrics = trainer.evaluate("val")
        assert set(task.metrics) <= set(metrics), f"evaluate() must return every declared metric {set(task.metrics)}"
        assert all(math.isfinite(float(v)) for v in metrics.values())


def registered_names(registry: Registry, kind: str) -> list[str]:
    """Sorted names of the registered tasks or controllers (for parametrizing contract tests)."""
    table = registry.tasks if kind == "task" else registry.controllers
    return sorted(table)
