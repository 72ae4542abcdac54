"""Every registered task and controller (built-in and installed third-party) passes metacore.testing's contracts.

Parametrized from the live registry, so a new plugin is covered by being registered. Tasks are built at their
``smoke`` preset with the real data (``../shared/data`` or ``METACORE_DATA_DIR``); a task whose data are absent skips.
The real-data built-ins (seconds to load and step even at ``smoke``) are trained in the ``slow`` class; their
declarations are checked in the fast one.
"""

from __future__ import annotations

import pytest
from conftest import shared_data_dir

from metacore.core.controller import Controller
from metacore.core.registry import load_registry
from metacore.testing import ControllerContract, TaskContract, TinyTask, registered_names

REGISTRY = load_registry()
TASKS = registered_names(REGISTRY, "task")
HEAVY_TASKS = [name for name in TASKS if name in {"cifar10", "imdb", "electricity"}]


def test_every_plugin_loads():
    assert REGISTRY.failures == {}, f"plugins failed to load: {REGISTRY.failures}"
    assert REGISTRY.tasks and REGISTRY.controllers


@pytest.fixture(scope="module")
def logged_schedule(tmp_path_factory):
    """A run with an ``hparam/lr`` trajectory, for the controllers that replay one (``replay``)."""
    from metacore.core.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path_factory.mktemp('source') / 'mlflow.db'}"
    tracker = MlflowTracker(uri)
    run_id = tracker.start_run("source", "schedule")
    for step in range(2, 30, 2):
        tracker.log_metrics(run_id, {"hparam/lr": 0.05 * 0.9 ** step, "hparam/momentum": 0.5}, step)
    tracker.end_run(run_id)
    return {"from": run_id, "tracking_uri": uri}


class TestRegisteredControllers(ControllerContract):
    @pytest.fixture(params=registered_names(REGISTRY, "controller"))
    def controller_class(self, request):
        return REGISTRY.controllers[request.param].obj

    @pytest.fixture
    def controller_options(self, controller_class, request):
        return request.getfixturevalue("logged_schedule") if "from" in controller_class.options else {}


class TestRegisteredTasks(TaskContract):
    @pytest.fixture(params=TASKS)
    def task(self, request):
        return REGISTRY.tasks[request.param].obj()

    @pytest.fixture
    def data_dir(self):
        return shared_data_dir()

    @pytest.fixture
    def task_data(self, task, data_dir, request):
        if task.name in HEAVY_TASKS:
            pytest.skip(f"{task.name}: data and training are checked by TestHeavyTasks (slow)")
        return self.load_task_data(task, data_dir, request)


@pytest.mark.slow
class TestHeavyTasks(TaskContract):
    @pytest.fixture(params=HEAVY_TASKS or [pytest.param(None, marks=pytest.mark.skip(reason="none registered"))])
    def task(self, request):
        return REGISTRY.tasks[request.param].obj()

    @pytest.fixture
    def data_dir(self):
        return shared_data_dir()


# ---------------------------------------------------------------------------------------------------- faulty ones
class _Faulty(Controller):
    """Proposes one bad value from its second step on (the trainer alone would clip or reject it)."""

    name = "faulty"
    proposal: dict = {}

    def act(self, state):
        return dict(self.proposal) if state.step >= 1 else {}


@pytest.mark.parametrize("proposal, fault", [
    ({"no_such_hparam": 0.1}, "does not declare"),
    ({"lr": float("nan")}, "non-finite"),
    ({"lr": 1e6}, "outside the declared bounds"),
    ({"lr": -0.1}, "outside the declared bounds"),
    ({"lr": "0.1"}, "not a number"),
    ({"lr": True}, "not a number"),
])
def test_controller_contract_catches_a_faulty_controller(proposal, fault):
    faulty = type("Faulty", (_Faulty,), {"proposal": proposal})
    contract = ControllerContract()
    with pytest.raises(AssertionError, match=f"controller 'faulty'.*{fault}"):
        contract.test_trains_within_bounds(lambda: faulty(), TinyTask())


def test_controller_contract_passes_a_well_behaved_controller():
    good = type("Good", (_Faulty,), {"proposal": {"lr": 0.02}})
    ControllerContract().test_trains_within_bounds(lambda: good(), TinyTask())
