"""Helpers for plugin authors: a plugin manager with chosen plugins only, tiny tasks, and contract test cases.

A third party checks its controller or task by subclassing a contract class in its own test suite and providing one
fixture (in the style of optuna's sampler test cases); pytest collects the inherited tests::

    import pytest
    from metacore.testing import ControllerContract, TaskContract

    class TestMyController(ControllerContract):
        @pytest.fixture
        def controller_class(self):
            return MyController

    class TestMyTask(TaskContract):
        @pytest.fixture
        def task(self):
            return MyTask()

metacore's own tasks and controllers pass the same classes (``tests/test_contracts.py``). The tiny tasks train in a
fraction of a second on a CPU, so a controller's contract runs on both an SGD-with-momentum and an Adam optimizer.

This module imports ``pytest`` (it is used from test suites only) and imports ``torch`` inside its functions.
"""

from metacore.testing.contracts import (
    ControllerContract,
    TaskContract,
    check_proposal,
    is_plain,
    registered_names,
    run_controller,
    step_context,
    task_context,
)
from metacore.testing.plugins import class_plugin, make_registry, plugin_manager
from metacore.testing.tiny import TinyAdamTask, TinyTask

__all__ = [
    "ControllerContract", "TaskContract", "TinyAdamTask", "TinyTask", "check_proposal", "class_plugin",
    "is_plain", "make_registry", "plugin_manager", "registered_names", "run_controller", "step_context", "task_context",
]
