"""Built-in controllers: ``static``, the schedules ``cosine`` and ``linear-warmup``, and the adaptive ones."""
