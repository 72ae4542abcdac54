"""Built-in optimizer plugins: torch's SGD/Adam/AdamW and the learning-rate-free optimizers from their own packages."""
