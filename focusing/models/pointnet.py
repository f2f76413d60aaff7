"""Local PointNet (paper §3.4, adapted from TripoSF / Convolutional Occupancy Networks): per-voxel features
pooled from the oriented surface points inside each voxel.

Each point is assigned to the voxel containing it at the latent resolution R. Its input is the offset to that
voxel's centre in voxel units scaled to [-1, 1] (2 ((p + 0.5) R - (ijk + 0.5))) and its normal. A stack of
fully connected ResNet blocks runs per point; before each block after the first, the features are pooled over
the points of the voxel (`local_pool`, max by default as in ConvONet) and concatenated back to every point. The
last features are pooled into the voxels (`pool`, mean as in TripoSF's config) after the output layer fc_c:
`[P, 6] -> [N, C]`. Voxels without points get zeros. The points are sorted by voxel once, so every pooling is
a segment reduction over contiguous runs of points (`torch.segment_reduce`: no atomics, unlike a scatter; B's
PointNet fwd+bwd on an H100 92.7 instead of 137.6 ms, docs/BENCHMARKS.md; forward alone on a CPU ~7% slower).
With mean pooling the hidden features are pooled first and fc_c runs per voxel (the mean of an affine map is
the map of the mean, so the result is the same up to float rounding): the widest layer (TripoSF: 256 -> 1024)
and its pooling then cost per voxel, not per point (~12 points a voxel in training).

Everything is local to a voxel, so the points can be processed in chunks of whole voxels with the same result
(`chunk_points`): each chunk is checkpointed when gradients are on, so training keeps only the chunk inputs
(32 bytes per point) instead of every block's per-point activations (measured with 12 points per voxel and
TripoSF's 1024 / 256 channels, 5 blocks: 42 KB per point in fp32, 32 GiB at 819,200 points, about half under
bf16 autocast), at the price of recomputing the forward pass, one chunk at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from focusing.device import fused
from focusing.sparse.lookup import find_voxels

_REDUCE = {"mean": "mean", "max": "max"}  # pooling name -> segment reduction


class ResnetBlockFC(nn.Module):
    """x -> shortcut(x) + fc_1(act(fc_0(act(x)))); `[P, C_in] -> [P, C_out]`; fc_1 starts at zero."""

    def __init__(self, in_channels: int, out_channels: int | None = None, hidden_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        hidden_channels = hidden_channels or min(in_channels, out_channels)
        self.fc_0 = nn.Linear(in_channels, hidden_channels)
        self.fc_1 = nn.Linear(hidden_channels, out_channels)
        self.act = nn.GELU(approximate="tanh")
        self.shortcut = nn.Linear(in_channels, out_channels, bias=False) if in_channels != out_channels else None
        nn.init.zeros_(self.fc_1.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dx = self.fc_1(self.act(self.fc_0(self.act(x))))
        return (self.shortcut(x) if self.shortcut is not None else x) + dx


def pool_to_voxels(feats: torch.Tensor, lengths: torch.Tensor, reduce: str) -> torch.Tensor:
    """`[N, C]` per-voxel `reduce` ("mean" or "max") of point features `[P, C]` sorted by voxel, where voxel i
    holds the `lengths[i]` points after those of voxels < i (`lengths` `[N]`, summing to P); 0 where empty."""
    if _REDUCE[reduce] == "mean":
        return torch.segment_reduce(feats, "mean", lengths=lengths, unsafe=True, initial=0.0)
    pooled = torch.segment_reduce(feats, "max", lengths=lengths, unsafe=True)  # -inf where empty
    return pooled.masked_fill((lengths == 0)[:, None], 0.0)


class LocalPointNet(nn.Module):
    """Oriented points -> per-voxel features `[N, out_channels]` (TripoSF: 6 -> 1024, hidden 256, 5 blocks)."""

    def __init__(
        self,
        out_channels: int = 1024,
        hidden_channels: int = 256,
        num_blocks: int = 5,
        *,
        pool: str = "mean",
        local_pool: str = "max",
        use_normals: bool = True,
        chunk_points: int = 0,
    ):
        super().__init__()
        self.chunk_points = chunk_points  # points per chunk of whole voxels (0: all at once, see the docstring)
        for name in (pool, local_pool):
            if name not in _REDUCE:
                raise ValueError(f"pooling must be one of {sorted(_REDUCE)}, got {name!r}")
        self.pool, self.local_pool, self.use_normals = pool, local_pool, use_normals
        self.fc_pos = nn.Linear(6 if use_normals else 3, 2 * hidden_channels)
        self.blocks = nn.ModuleList(ResnetBlockFC(2 * hidden_channels, hidden_channels) for _ in range(num_blocks))
        self.fc_c = nn.Linear(hidden_channels, out_channels)

    def forward(
        self,
        points: torch.Tensor,
        normals: torch.Tensor | None,
        coords: torch.Tensor,
        resolution: int,
        point_batch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """points, normals `[P, 3]` in [-0.5, 0.5]^3; coords `[N, 4]` voxels at `resolution`; point_batch `[P]`
        batch index of each point (default 0). Points whose voxel is not in coords are ignored."""
        ijk = torch.floor((points + 0.5) * resolution).clamp_(0, resolution - 1)
        batch = torch.zeros_like(ijk[:, :1]) if point_batch is None else point_batch[:, None].to(ijk.dtype)
        voxel = find_voxels(torch.cat([batch, ijk], dim=1).to(torch.int64), coords)
        inside = voxel >= 0
        voxel = voxel[inside]
        offset = 2.0 * ((points[inside] + 0.5) * resolution - (ijk[inside] + 0.5))
        net = torch.cat([offset, normals[inside]], dim=1) if self.use_normals else offset
        order = torch.argsort(voxel, stable=True)  # points sorted by voxel: pooling reduces contiguous runs
        voxel, net = voxel[order], net[order]
        counts = torch.zeros(len(coords), dtype=voxel.dtype, device=voxel.device).index_add_(
            0, voxel, torch.ones_like(voxel))  # [N] points per voxel (a bincount would sync with the host)
        features = fused(self._voxel_features)
        if self.chunk_points <= 0 or len(voxel) <= self.chunk_points:
            return features(net, voxel, counts)
        ends = counts.cumsum(0)  # [N] points up to and including voxel i
        marks = torch.arange(self.chunk_points, len(voxel), self.chunk_points, device=ends.device)
        bounds = torch.unique(torch.cat([torch.searchsorted(ends, marks) + 1, ends.new_tensor([len(coords)])]))
        parts, lo, start = [], 0, 0
        his, stops = torch.stack([bounds, ends[bounds - 1]]).tolist()  # one host sync for all chunks
        for hi, stop in zip(his, stops):  # chunk: voxels [lo, hi) and their points [start, stop)
            args = (net[start:stop], voxel[start:stop] - lo, counts[lo:hi])
            grad = torch.is_grad_enabled() and (net.requires_grad or any(p.requires_grad for p in self.parameters()))
            parts.append(checkpoint(features, *args, use_reentrant=False) if grad else features(*args))
            lo, start = hi, stop
        return torch.cat(parts)

    def _voxel_features(self, net: torch.Tensor, voxel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Point inputs `[P, 6]` sorted by their voxel index `[P]` in [0, N), `lengths` `[N]` points per voxel ->
        pooled features `[N, C]`."""
        net = self.blocks[0](self.fc_pos(net))
        for block in self.blocks[1:]:
            pooled = pool_to_voxels(net, lengths, self.local_pool).index_select(0, voxel)
            net = block(torch.cat([net, pooled], dim=1))
        if self.pool == "mean":  # the mean commutes with the affine fc_c: widen per voxel, not per point
            return self.fc_c(pool_to_voxels(net, lengths, "mean")) * (lengths > 0)[:, None]  # empty voxels stay 0
        return pool_to_voxels(self.fc_c(net), lengths, self.pool)
