"""Training: configs, the VAE objective, the trainer (AMP, DDP via torchrun, checkpoints, resume, logging)."""
