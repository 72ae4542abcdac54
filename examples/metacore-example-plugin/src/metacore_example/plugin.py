"""The module the ``metacore`` entry point names: registration hooks only, nothing heavy imported."""

from metacore import hookimpl

from metacore_example.controller import PlateauController
from metacore_example.task import BreastCancerTask


@hookimpl
def metacore_register_tasks(register):
    register(BreastCancerTask)


@hookimpl
def metacore_register_controllers(register):
    register(PlateauController)
