"""metacore: tune a model's hyperparameters while it trains, and prove it against a static baseline in MLflow.

The public API is re-exported here. Importing it loads no torch, mlflow or transformers.
"""

from metacore.core.controller import Controller, GradientObserver, StepContext, TensorRates
from metacore.core.errors import MetacoreError
from metacore.core.hookspecs import hookimpl, hookspec
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.optimizer import Optimizer
from metacore.core.options import OptionSpec
from metacore.core.registry import get_plugin_manager, load_registry
from metacore.core.state import TrainingState
from metacore.core.task import Preset, Task, TaskContext, TaskData

__version__ = "0.1.0"

__all__ = [
    "Controller", "GradientObserver", "HParamSpace", "HParamSpec", "MetacoreError", "Optimizer", "OptionSpec", "Preset",
    "StepContext", "TensorRates", "Task", "TaskContext", "TaskData", "TrainingState", "get_plugin_manager", "hookimpl",
    "hookspec", "load_registry", "__version__",
]
