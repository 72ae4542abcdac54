"""Integrations with other training loops: ``metacore.integrations.huggingface`` (a ``transformers.Trainer``
callback) and ``metacore.integrations.lightning`` (a ``lightning.pytorch.Trainer`` callback), both on the engine's
controller driver and ``optimizer_groups`` (the framework-free param-group writer they share).

Each integration imports its framework when imported itself; this package imports nothing.
"""
