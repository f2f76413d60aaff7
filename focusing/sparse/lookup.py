"""Find voxels of one coordinate set in another (sort + `searchsorted` on linearised keys)."""

from __future__ import annotations

import torch

from focusing.data.grid import linearize


def find_voxels(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`[M]` int64: row of each voxel of `query` `[M, 4]` in `reference` `[K, 4]`, or -1 where it is absent.

    Both are integer (batch, x, y, z) coords with x, y, z >= 0; `reference` need not be sorted.
    """
    if len(reference) == 0 or len(query) == 0:
        return torch.full((len(query),), -1, dtype=torch.int64, device=query.device)
    extent = int(torch.maximum(query[:, 1:].max(), reference[:, 1:].max()).item()) + 1
    ref_keys, order = torch.sort(linearize(reference, extent))
    keys = linearize(query, extent)
    pos = torch.searchsorted(ref_keys, keys).clamp_(max=len(ref_keys) - 1)
    return torch.where(ref_keys[pos] == keys, order[pos], -1)


def occupancy(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`[M]` bool: is each voxel of `query` `[M, 4]` present in `reference` `[K, 4]`?"""
    return find_voxels(query, reference) >= 0
