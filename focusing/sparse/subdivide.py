"""Subdivision: each voxel -> its 8 children at twice the resolution."""

from __future__ import annotations

import torch

from focusing.data.grid import CORNER_OFFSETS, linearize
from focusing.sparse.gather import permute_rows
from focusing.sparse.tensor import SparseTensor


def subdivide(x: SparseTensor, child_feats: torch.Tensor | None = None) -> tuple[SparseTensor, torch.Tensor]:
    """The 8 children (2 xyz + CORNER_OFFSETS[k]) of every voxel of `x`, at resolution 2R, sorted.

    child_feats: `[N, 8, C]` features of child k of voxel i (e.g. from a learned layer); default: the parent's
    features copied to its 8 children.
    Returns (children with feats `[8N, C]`, parent `[8N]` int64: row of each child's parent in `x`).
    Children keep their parent's batch index, so the batch layout (contiguous, same batch size) is kept.
    """
    n = len(x)
    offsets = CORNER_OFFSETS.to(x.device)
    coords = x.coords[:, None, :].repeat(1, 8, 1)
    coords[:, :, 1:] = coords[:, :, 1:] * 2 + offsets
    coords = coords.reshape(-1, 4)
    # children of one parent are contiguous and parents are sorted, so a sort by key restores global order
    order = torch.argsort(linearize(coords, 2 * x.spatial_extent))
    parent = torch.div(order, 8, rounding_mode="floor")
    if child_feats is None:
        feats = x.feats.index_select(0, parent)
    else:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(8 * n, device=x.device)
        feats = permute_rows(child_feats.reshape(8 * n, *child_feats.shape[2:]), order, inverse)
    resolution = 2 * x.resolution if x.resolution is not None else None
    return SparseTensor(coords[order], feats, batch_size=x.batch_size, resolution=resolution), parent
