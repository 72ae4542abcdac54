"""Analysis of logged runs: statistics over seeds against the baseline, plots, a markdown report, grid benches.

``stats`` is pure numpy/scipy; ``runs`` reads runs back from MLflow (or from the in-memory tracker); ``compare``
groups them into rows; ``plots`` draws with matplotlib's Agg backend; ``report`` writes markdown; ``bench`` runs a
grid through the same code path as ``metacore run``. Nothing heavy is imported at package import time.
"""
