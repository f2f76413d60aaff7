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



def find_rows(coords: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Row of each `query` [Q, 4] in `coords` [N, 4] (unique rows, any order), by `searchsorted` on sorted keys.

    Returns [Q] int64 row indices into `coords`, -1 where the query is absent (or has a negative coordinate).
    """
    if len(coords) == 0 or len(query) == 0:
        return torch.full((len(query),), -1, dtype=torch.int64, device=query.device)
    c, q = coords.to(torch.int64), query.to(torch.int64)
    valid = (q[:, 1:] >= 0).all(1)
    q = torch.where(valid[:, None], q, torch.zeros_like(q))
    extent = int(torch.maximum(c[:, 1:].max(), q[:, 1:].max()).item()) + 1
    keys, order = torch.sort(linearize(c, extent))
    qkeys = linearize(q, extent)
    pos = torch.searchsorted(keys, qkeys).clamp_(max=len(keys) - 1)
    found = (keys[pos] == qkeys) & valid
    return torch.where(found, order[pos], torch.full_like(pos, -1))


def neighbor_index(coords: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[N, K] int64: row of `coords[n] + offsets[k]` (same batch) in `coords` [N, 4], -1 where absent."""
    query = coords[:, None, :].to(torch.int64).repeat(1, len(offsets), 1)
    query[:, :, 1:] += offsets.to(device=coords.device, dtype=torch.int64)
    return find_rows(coords, query.reshape(-1, 4)).reshape(len(coords), len(offsets))
