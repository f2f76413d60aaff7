"""Self-pruning upsampling (paper §3.4): subdivide every voxel into its 8 children, refine them with a sparse
convolution residual block, predict each child's occupancy, keep the occupied children.

In training the children are pruned by the ground-truth occupancy (the paper: predicted occupancy is only
supervised, never used to prune while training, which would open holes); at inference by the predicted logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from focusing.sparse.conv import SubMConv3d
from focusing.sparse.lookup import occupancy
from focusing.sparse.subdivide import subdivide
from focusing.sparse.tensor import SparseTensor

KEEP_LOGIT = 0.0  # at inference a child is kept when its occupancy logit exceeds this (p > 0.5)


class SparseResBlock(nn.Module):
    """Pre-activation residual block of two 3^3 submanifold convolutions: x + conv(act(norm(conv(act(norm(x)))))).

    The second convolution starts at zero, so a new block starts as the identity (or the skip projection).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel_size: int = 3):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.LayerNorm(in_channels, eps=1e-6)
        self.conv1 = SubMConv3d(in_channels, out_channels, kernel_size)
        self.norm2 = nn.LayerNorm(out_channels, eps=1e-6)
        self.conv2 = SubMConv3d(out_channels, out_channels, kernel_size)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Linear(in_channels, out_channels) if in_channels != out_channels else nn.Identity()

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = self.conv2(h.replace(F.silu(self.norm2(h.feats))))
        return x.replace(self.skip(x.feats) + h.feats)


@dataclass
class UpsampleOutput:
    """children: all children (resolution 2R, sorted) with their refined features `[8N, C_out]`; logits `[8N]` their
    occupancy logits; target `[8N]` bool ground-truth occupancy (None without targets); keep `[8N]` bool: which
    children were kept; x = children.select(keep)."""

    children: SparseTensor
    logits: torch.Tensor
    target: torch.Tensor | None
    keep: torch.Tensor
    x: SparseTensor


class SelfPruningUpsample(nn.Module):
    """Subdivide -> sparse conv residual blocks -> occupancy logits -> prune. feats `[N, C_in]` -> `[M, C_out]`, 2R.

    learned: each child gets its own features from a linear map of its parent (`C_in -> 8 C_out`, like a
    stride-2 transposed convolution); otherwise the parent's features (projected to C_out) are copied.
    """

    def __init__(self, in_channels: int, out_channels: int, *, learned: bool = True, num_res_blocks: int = 1):
        super().__init__()
        self.out_channels, self.learned = out_channels, learned
        self.to_children = nn.Linear(in_channels, (8 if learned else 1) * out_channels)
        self.blocks = nn.ModuleList(SparseResBlock(out_channels) for _ in range(num_res_blocks))
        self.occupancy_head = nn.Sequential(nn.LayerNorm(out_channels, eps=1e-6), nn.Linear(out_channels, 1))

    @property
    def reach(self) -> int:
        """Parent voxels (Chebyshev distance) whose children a child's features and logit depend on: the children's
        convolutions read r child voxels away, and children 2p + o, 2q + o' (o, o' in {0, 1}) within r have
        |p - q| <= (r + 1) // 2."""
        r = sum((conv.kernel_size // 2) * conv.dilation for block in self.blocks for conv in (block.conv1, block.conv2))
        return (r + 1) // 2

    def forward(self, x: SparseTensor, target_coords: torch.Tensor | None = None,
                keep_logit: float = KEEP_LOGIT) -> UpsampleOutput:
        """target_coords: `[K, 4]` ground-truth occupied voxels at 2R (gives `target` for the occupancy loss).

        Children are kept by the ground truth in training mode (when given), by logits > `keep_logit` otherwise.
        """
        h = self.to_children(x.feats)
        if self.learned:
            children, _ = subdivide(x, h.view(len(x), 8, self.out_channels))
        else:
            children, _ = subdivide(x.replace(h))
        for block in self.blocks:
            children = block(children)
        logits = self.occupancy_head(children.feats).squeeze(-1).float()
        target = occupancy(children.coords, target_coords) if target_coords is not None else None
        keep = target if target is not None and self.training else logits > keep_logit
        return UpsampleOutput(children, logits, target, keep, children.select(keep))
