"""The voxel grid convention shared by every module: centres, corners and linearised keys.

A grid of resolution R covers [-0.5, 0.5]^3. Voxel (i, j, k) has centre ((i, j, k) + 0.5) / R - 0.5 and
corners at (i, j, k) / R - 0.5, i.e. corner coordinates run over 0..R. Sparse coordinates are int32
`[N, 4]` = (batch, x, y, z). Corner k of a voxel is offset (k & 1, (k >> 1) & 1, (k >> 2) & 1): x fastest,
the FlexiCubes cube-corner order.
"""

from __future__ import annotations

import torch

CORNER_OFFSETS = torch.tensor([[(k >> 0) & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], dtype=torch.int32)
"""[8, 3] offset of corner k from the voxel's minimum corner."""


def voxel_centers(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """[N, 3] float32 centres in [-0.5, 0.5]^3 of voxels `coords` [N, 4] (or [N, 3] xyz)."""
    xyz = coords[:, -3:].to(torch.float32)
    return (xyz + 0.5) / resolution - 0.5


def corner_positions(corners: torch.Tensor, resolution: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[M, 3] positions (float32 unless `dtype`) of grid corners `corners` [M, 4] (or [M, 3] xyz), each in 0..R."""
    return corners[:, -3:].to(dtype) / resolution - 0.5


def linearize(coords: torch.Tensor, extent: int) -> torch.Tensor:
    """[N] int64 keys of `coords` [N, 4] (batch, x, y, z) with x, y, z in [0, extent): order = lexicographic.

    Keys sort exactly like the coordinates, so `torch.searchsorted` on sorted keys finds coordinates.
    """
    c = coords.to(torch.int64)
    return ((c[:, 0] * extent + c[:, 1]) * extent + c[:, 2]) * extent + c[:, 3]


def delinearize(keys: torch.Tensor, extent: int) -> torch.Tensor:
    """Inverse of `linearize`: [N] int64 keys -> [N, 4] int32 (batch, x, y, z)."""
    z = keys % extent
    rest = keys // extent
    y = rest % extent
    rest = rest // extent
    x = rest % extent
    b = rest // extent
    return torch.stack([b, x, y, z], dim=1).to(torch.int32)


def voxel_corners(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique corners of voxels `coords` [N, 4] and, per voxel, the index of each of its 8 corners.

    Returns (corners [M, 4] int32 sorted by (batch, x, y, z), voxel_to_corner [N, 8] int64).
    Corners shared by neighbouring voxels (same batch) appear once. Uses sort/unique on linearised keys.
    """
    extent = int(coords[:, 1:].max().item()) + 2 if len(coords) else 2
    offsets = CORNER_OFFSETS.to(coords.device)
    all_corners = coords[:, None, :].clone().repeat(1, 8, 1)
    all_corners[:, :, 1:] += offsets
    keys = linearize(all_corners.reshape(-1, 4), extent)
    unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    return delinearize(unique_keys, extent), inverse.reshape(-1, 8)
