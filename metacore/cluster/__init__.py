"""Past one machine, through Ray: bench units as Ray tasks (``ray_bench``), Ray Tune's PBT / PB2 / ASHA over the
Trainer (``tune``, ``tune_trial``), and connecting to a local or remote Ray instance (``ray_runtime``).

Ray is an optional extra (``pip install "metacore[ray]"``); nothing here imports it at module level.
"""
