"""An example metacore plugin: a task (``breast-cancer``) and a controller (``plateau``)."""

from metacore_example.controller import PlateauController
from metacore_example.task import BreastCancerTask

__all__ = ["BreastCancerTask", "PlateauController"]
