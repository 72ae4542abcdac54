"""The application: planning and executing runs (``runner``), resuming them, benches (``bench``), PPO meta-training
(``meta_train``) and progress bars. The one layer that combines the engine, the store and analysis; the CLI commands
call it. Nothing here imports torch or mlflow at module level.
"""
