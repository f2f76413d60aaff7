"""Training: typed configs, the VAE objective (carving, zoom, Eq. 7), the trainer (AMP, EMA, torchrun data
parallelism, time budgets), checkpoints without pickle, and the weights export."""
