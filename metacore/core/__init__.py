"""metacore's core: plugin hooks, registry, hyperparameter specs, the training loop, tracking.

Nothing here imports torch or mlflow at module level; the modules that need them import inside functions.
"""
