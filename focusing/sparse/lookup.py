"""Find voxels of one coordinate set in another, and grow a subset within a set (sort + `searchsorted` on
linearised keys)."""

from __future__ import annotations

import torch

from focusing.data.grid import linearize


class VoxelIndex:
    """A voxel set `[K, 4]` (batch, x, y, z), sorted once for any number of lookups (`find`)."""

    def __init__(self, reference: torch.Tensor):
        self.extent = int(reference[:, 1:].max().item()) + 1 if len(reference) else 1
        self.keys, self.order = torch.sort(linearize(reference, self.extent))

    def find(self, query: torch.Tensor) -> torch.Tensor:
        """`[M]` int64: row of each voxel of `query` `[M, 4]` in the set, or -1 where it is absent (also where a
        coordinate lies outside the set's box, negative ones included)."""
        if len(self.keys) == 0 or len(query) == 0:
            return torch.full((len(query),), -1, dtype=torch.int64, device=query.device)
        inside = ((query[:, 1:] >= 0) & (query[:, 1:] < self.extent)).all(1)
        keys = linearize(query, self.extent)
        pos = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        return torch.where((self.keys[pos] == keys) & inside, self.order[pos], -1)


def find_voxels(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`[M]` int64: row of each voxel of `query` `[M, 4]` in `reference` `[K, 4]` (need not be sorted), or -1
    where it is absent; both integer (batch, x, y, z) coords (`VoxelIndex` to look up one set many times)."""
    return VoxelIndex(reference).find(query)


def occupancy(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`[M]` bool: is each voxel of `query` `[M, 4]` present in `reference` `[K, 4]`?"""
    return find_voxels(query, reference) >= 0


def dilate_within(coords: torch.Tensor, resolution: int, keep: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """[N] bool: `keep` [N] plus every voxel of `coords` [N, 4] within `radius` (Chebyshev) of a kept voxel of the
    same batch item. One sort of the keys and one `searchsorted` of all (2 radius + 1)^3 neighbours of the kept
    voxels (one host sync, for the kept count)."""
    if radius <= 0:
        return keep.clone()
    extent = resolution + 2 * radius  # shifted by `radius`, so neighbours outside the grid keep valid keys
    keys = linearize(coords.to(torch.int64) + torch.tensor([0, radius, radius, radius], device=coords.device),
                     extent)
    ref, order = torch.sort(keys)
    steps = torch.arange(-radius, radius + 1, device=coords.device)
    dx, dy, dz = torch.meshgrid(steps, steps, steps, indexing="ij")
    query = (keys[keep][:, None] + ((dx * extent + dy) * extent + dz).reshape(1, -1)).reshape(-1)
    pos = torch.searchsorted(ref, query).clamp_(max=max(len(ref) - 1, 0))
    hits = torch.zeros(len(coords), dtype=torch.int32, device=coords.device)
    if len(query):
        hits.index_add_(0, order[pos], (ref[pos] == query).to(torch.int32))
    return keep | (hits > 0)
