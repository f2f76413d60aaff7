"""3-vector helpers on [..., 3] tensors, written per component.

`(a * b).sum(-1)` and `torch.linalg.cross` reduce over / dispatch on a size-3 last dimension, which is several
times slower on CPU than three fused multiply-adds on strided component views; the geometry kernels of the
data pipeline (SAT, distances, solid angles) are dominated by these, so they use the helpers below.
"""

from __future__ import annotations

import torch


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[...] a . b of [..., 3] tensors (broadcasting)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., 3] a x b of [..., 3] tensors (broadcasting)."""
    ax, ay, az = a[..., 0], a[..., 1], a[..., 2]
    bx, by, bz = b[..., 0], b[..., 1], b[..., 2]
    return torch.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx], -1)


def norm(a: torch.Tensor) -> torch.Tensor:
    """[...] Euclidean length of [..., 3] tensors."""
    return dot(a, a).sqrt()
