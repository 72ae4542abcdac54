"""The PPO meta-policy: a gymnasium environment over real training runs, meta-training, and the ``ppo`` controller.

Modules: :mod:`.features` (task-agnostic observations), :mod:`.env` (``metacore/HyperparamControl-v0``),
:mod:`.policy` (safetensors + JSON format), :mod:`.plugin` (the ``ppo`` controller, the module the plugin registry
imports). Meta-training (stable-baselines3, MLflow, the runner) is an application: :mod:`metacore.app.meta_train`.

Importing this package registers ``metacore/HyperparamControl-v0`` with gymnasium without importing gymnasium itself
(importing it costs a fifth of a second, and ``metacore list`` imports this package through the plugin module):
if gymnasium is already imported the id is registered now; otherwise a one-shot import hook registers it right after
gymnasium's own import finishes. Either order works::

    import gymnasium as gym, metacore.controllers.ppo
    env = gym.make("metacore/HyperparamControl-v0", task="digits", preset="smoke")
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

ENV_ID = "metacore/HyperparamControl-v0"
ENTRY_POINT = "metacore.controllers.ppo.env:HyperparamControlEnv"


def register_env() -> None:
    """Register the environment id with gymnasium (idempotent); imports gymnasium."""
    import gymnasium

    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point=ENTRY_POINT)


class _RegisterAfterGymnasium(importlib.abc.MetaPathFinder):
    """Wraps gymnasium's loader once so the id is registered when ``import gymnasium`` completes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "gymnasium":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                if ENV_ID not in module.registry:
                    module.register(id=ENV_ID, entry_point=ENTRY_POINT)

            def __getattr__(self, name):  # resource readers and the like: the real loader's
                return getattr(loader, name)

        spec.loader = _Loader()
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterGymnasium)]


if "gymnasium" in sys.modules:
    register_env()
elif not any(isinstance(f, _RegisterAfterGymnasium) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterGymnasium())
