"""Integrations with other training loops (``metacore.integrations.huggingface``: a ``transformers.Trainer`` callback).

Each integration imports its framework when imported itself; this package imports nothing.
"""
