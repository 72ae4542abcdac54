"""``static``: keeps the initial hyperparameters; the baseline every adaptive controller is compared with."""

from __future__ import annotations

from metacore.core.controller import Controller
from metacore.core.hookspecs import hookimpl


class StaticController(Controller):
    """Keeps the initial hyperparameters for the whole run."""

    name = "static"
    description = "keeps the initial hyperparameters (the baseline)"


@hookimpl
def metacore_register_controllers(register):
    register(StaticController)
