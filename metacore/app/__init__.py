"""The application: planning and executing runs (``runner``), resuming them, benches (``bench``), PPO meta-training
(``meta_train`` and its ``meta_*`` parts), progress bars, and through Ray (an optional extra): bench units as Ray
tasks (``ray_bench``), Ray Tune's PBT / PB2 / ASHA over the Trainer (``tune``, ``tune_trial``), connecting to Ray
(``ray_runtime``). The one layer that combines the engine, the store and analysis; the CLI commands call it. Nothing
here imports torch, mlflow or ray at module level.
"""
