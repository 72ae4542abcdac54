"""Built-in task plugins: ``digits`` (offline demo), ``cifar10``, ``imdb``, ``electricity``."""
