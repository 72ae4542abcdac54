"""The example plugin checked the way any third-party plugin checks itself: metacore.testing's contracts."""

import pytest
from metacore.core.state import TrainingState
from metacore.testing import ControllerContract, TaskContract, make_registry, run_controller

from metacore_example import BreastCancerTask, PlateauController


class TestPlateauContract(ControllerContract):
    @pytest.fixture
    def controller_class(self):
        return PlateauController

    @pytest.fixture
    def controller_options(self):
        return {"patience": 1}  # reduce early, so the contract sees it change something


class TestBreastCancerContract(TaskContract):
    @pytest.fixture
    def task(self):
        return BreastCancerTask()


def _state(history, lr=0.1, direction="max"):
    return TrainingState(step=len(history), epoch=0.0, budget=100, train_loss=1.0, train_losses=(1.0,),
                         val_metrics={}, hparams={"lr": lr}, primary_metric="accuracy", direction=direction,
                         val_history=tuple(history))


def test_plateau_reduces_after_patience_evaluations():
    c = PlateauController(patience=2, factor=0.5)
    c.reset({"lr": 0.1}, 0, BreastCancerTask().hparam_space(), 100)
    assert c.act(_state([0.5])) == {}
    assert c.act(_state([0.5, 0.6])) == {}  # improved
    assert c.act(_state([0.5, 0.6, 0.6])) == {}  # one evaluation without improvement
    assert c.act(_state([0.5, 0.6, 0.6, 0.59])) == {"lr": pytest.approx(0.05)}
    assert c.act(_state([0.5, 0.6, 0.6, 0.59])) == {}  # nothing new to read
    # "min" metrics improve downwards
    m = PlateauController(patience=1, factor=0.1)
    m.reset({"lr": 1.0}, 0, BreastCancerTask().hparam_space(), 100)
    assert m.act(_state([3.0, 2.0], direction="min")) == {}
    assert m.act(_state([3.0, 2.0, 2.5], direction="min")) == {"lr": pytest.approx(0.1)}


def test_registered_and_trains_to_a_useful_accuracy():
    registry = make_registry("metacore_example.plugin")
    assert set(registry.tasks) == {"breast-cancer"} and set(registry.controllers) == {"plateau"}
    _, result = run_controller(PlateauController(patience=1), BreastCancerTask(), steps=60)
    assert not result.diverged
    assert result.final["val/accuracy"] > 0.85  # chance is 0.63 (the majority class)
