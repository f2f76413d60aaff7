"""Hole closing: find the pinholes of a SparseFlex surface on a pruned voxel set, and fill them from candidates.

At inference the self-pruning upsamplers keep a child voxel when its occupancy logit exceeds a threshold. A voxel
the surface runs through but the upsampler pruned takes the quads of every crossed grid edge it holds with it
(`sparseflex_mesh` builds a quad only where all 4 voxels around a crossed edge are present), which leaves a
pinhole: focusing-S at R = 256 leaves 2,354 holes of ~6 boundary edges in the bunny.

The rule, on a voxel set with per-voxel corner SDFs (averaged over shared corners, as extraction does):
- an *open ring* is a crossed grid edge (its two corners of opposite sign) held by 1 to 3 voxels of the set;
  the absent voxels around it are where the surface runs out of the set;
- those absent voxels group into 26-connected components: a *hole* is a component of at most `max_voxels`
  voxels; a long component (the rim of an open sheet, a wire's side, a surface leaving the decoded band) is a
  boundary the surface really has, or one it should not grow across, and is left open;
- `close_holes` adds the hole voxels that are candidates (children the upsampler computed and pruned, with a
  logit above a floor), in passes, until none is added; at the corners they share with kept voxels they take the
  kept voxels' values, so closing only adds patches and leaves the rest of the surface as it was.

Known limits: a hole wider than `max_voxels` stays open; a small gap between two parts that the surface bridges
is a hole by this rule and gets filled when the upsampler has candidates there.
"""

from __future__ import annotations

import torch

from focusing.data.grid import CORNER_OFFSETS, voxel_corners
from focusing.sparse.lookup import VoxelIndex, find_voxels
from focusing.sparseflex.extract import average_corners
from focusing.sparseflex.tables import tables_on

MAX_HOLE_VOXELS = 8  # absent voxels of one hole at most (focusing-S's pinholes: 1-2 voxels)
PASSES = 2  # fill passes at most (the second fills what the first opened next to its patches; a third adds ~1%)


def _ring_offsets(device) -> torch.Tensor:
    """[3, 4, 4] (axis, slot, (0, dx, dy, dz)): voxel = lower corner of a grid edge along `axis` + offset, for the
    4 voxels around that edge (voxel v holds the edge as its edge 4 axis + j when the edge starts at v's corner
    `edge_corners[4 axis + j, 0]`)."""
    lower = tables_on(device)["edge_corners"][:, 0].reshape(3, 4)
    offsets = torch.zeros(3, 4, 4, dtype=torch.int32, device=device)
    offsets[..., 1:] = -CORNER_OFFSETS.to(device)[lower]
    return offsets


def open_ring_voxels(coords: torch.Tensor, sdf: torch.Tensor) -> torch.Tensor:
    """[M, 4] int32, unique: the voxels absent from `coords` [N, 4] around the open rings of the surface that the
    per-voxel corner SDFs `sdf` [N, 8] (averaged over shared corners) give on that set."""
    if len(coords) == 0:
        return coords
    corners, v2c = voxel_corners(coords)
    inside = average_corners(sdf[..., None], v2c, len(corners))[:, 0] < 0
    corner_index, voxel_index = VoxelIndex(corners), VoxelIndex(coords)
    rings = _ring_offsets(coords.device)
    absent = []
    for axis in range(3):
        step = torch.zeros(4, dtype=torch.int32, device=coords.device)
        step[1 + axis] = 1
        upper = corner_index.find(corners + step)
        lower = torch.nonzero(upper >= 0).squeeze(1)
        lower = lower[inside[lower] != inside[upper[lower]]]  # crossed edges between two corners of the set
        ring = corners[lower][:, None, :] + rings[axis]  # [E, 4, 4]
        present = (voxel_index.find(ring.reshape(-1, 4)) >= 0).reshape(-1, 4)
        open_ = present.any(1) & ~present.all(1)
        absent.append(ring[open_][~present[open_]])
    return torch.unique(torch.cat(absent), dim=0)


def small_components(coords: torch.Tensor, max_voxels: int) -> torch.Tensor:
    """[M] bool: is each voxel of `coords` [M, 4] (unique) in a 26-connected component of at most `max_voxels`?

    Min-label propagation over the neighbour pairs for at most `max_voxels` rounds: a component that small has
    settled on one label by then; one with two labels still touching each other is larger, and so is any label
    that is shared by more than `max_voxels` voxels.
    """
    m = len(coords)
    if m == 0:
        return torch.zeros(0, dtype=torch.bool, device=coords.device)
    steps = torch.tensor([-1, 0, 1], device=coords.device)
    offsets = torch.cartesian_prod(steps, steps, steps).to(torch.int32)
    offsets = offsets[[tuple(o) > (0, 0, 0) for o in offsets.tolist()]]  # 13: each pair once
    index = VoxelIndex(coords)
    found = torch.stack([index.find(coords + torch.nn.functional.pad(o, (1, 0))) for o in offsets])  # [13, M]
    u = torch.arange(m, device=coords.device).expand_as(found)[found >= 0]
    w = found[found >= 0]
    label = torch.arange(m, device=coords.device)
    for _ in range(max_voxels):
        new = label.scatter_reduce(0, u, label[w], "amin").scatter_reduce(0, w, label[u], "amin")
        if torch.equal(new, label):
            break
        label = new
    large = torch.bincount(label, minlength=m) > max_voxels
    split = label[u] != label[w]
    large[label[u[split]]] = True
    large[label[w[split]]] = True
    return ~large[label]


def hole_voxels(coords: torch.Tensor, sdf: torch.Tensor, max_voxels: int = MAX_HOLE_VOXELS) -> torch.Tensor:
    """[H, 4] int32: the open-ring voxels of (`coords` [N, 4], `sdf` [N, 8]) that belong to holes."""
    absent = open_ring_voxels(coords, sdf)
    return absent[small_components(absent, max_voxels)]


def close_holes(coords: torch.Tensor, sdf: torch.Tensor, deform: torch.Tensor, keep: torch.Tensor,
                candidate: torch.Tensor, *, holes: torch.Tensor | None = None, max_voxels: int = MAX_HOLE_VOXELS,
                passes: int = PASSES):
    """Fill the holes of the kept voxels' surface from the candidates; the kept voxels' surface stays as it was.

    coords `[N, 4]`, sdf `[N, 8]`, deform `[N, 8, 3]`: every voxel's own corner predictions, kept or not; keep,
    candidate `[N]` bool; holes: `hole_voxels` of the kept voxels, when the caller has them. Returns (keep `[N]`: `keep` plus the candidates that fill holes, sdf, deform): the
    added voxels' predictions at corners a kept voxel has are replaced by the kept voxels' mean there, so that
    extraction over the new set gives the old surface plus the patches (the added voxels' own predictions were
    never trained, and would move the corners they share).
    """
    kept = keep
    keep = keep.clone()
    index = VoxelIndex(coords)
    for i in range(passes):
        found = index.find(holes if i == 0 and holes is not None else hole_voxels(coords[keep], sdf[keep], max_voxels))
        found = found[found >= 0]
        found = found[candidate[found] & ~keep[found]]
        if len(found) == 0:
            break
        keep[found] = True
    return (keep, *_pin_shared_corners(coords, sdf, deform, kept, keep & ~kept))


def _pin_shared_corners(coords, sdf, deform, kept, added):
    """sdf `[N, 8]`, deform `[N, 8, 3]` with the `added` voxels' values at corners of `kept` voxels set to the
    kept voxels' mean (`average_corners`, as extraction takes it)."""
    corners, v2c = voxel_corners(coords[kept])
    field = average_corners(torch.cat([sdf[kept][..., None], deform[kept]], -1), v2c, len(corners))  # [M, 4]
    rows = torch.nonzero(added).squeeze(1)
    own = coords[rows][:, None, :].repeat(1, 8, 1)
    own[..., 1:] += CORNER_OFFSETS.to(coords.device)
    found = find_voxels(own.reshape(-1, 4), corners).reshape(-1, 8)
    shared = found >= 0
    pinned = torch.cat([sdf[rows][..., None], deform[rows]], -1)  # [A, 8, 4]
    pinned[shared] = field[found[shared]]
    sdf, deform = sdf.clone(), deform.clone()
    sdf[rows], deform[rows] = pinned[..., 0], pinned[..., 1:]
    return sdf, deform
