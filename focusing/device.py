"""The torch device a user names: "auto" (or None) means CUDA when it is available, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """torch.device for "auto" / None (CUDA if available, else CPU) or any name torch accepts ("cpu", "cuda:1")."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
