"""Training: typed configs, the trainer (AMP, EMA, torchrun data parallelism, budgets), checkpoints without
pickle, and the weights export."""
