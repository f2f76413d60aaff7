"""`SparseTensor`: sparse voxels (int32 coords) with features, and a cache shared by every tensor of one structure.

A structure is a set of voxel coordinates `[N, 4]` = (batch, x, y, z), int32, sorted lexicographically, so each
batch item is one contiguous block of rows. Everything that depends only on the structure (neighbour maps of
the sparse convolution, the window partitions of the attention, the batch layout) is computed once, stored in
the structure's `SpatialCache` and reused by every layer: `x.replace(new_feats)` keeps the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from focusing.data.grid import linearize
from focusing.sparse.gather import select_rows


class SpatialCache(dict):
    """Per-structure memo: key -> value (index tensors, partitions, ...), shared by tensors with the same coords."""

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key not in self:
            self[key] = compute()
        return self[key]


class SparseTensor:
    """Sparse voxels with features.

    coords: `[N, 4]` int32 (batch, x, y, z), sorted lexicographically (each batch item contiguous), x, y, z >= 0.
    feats: `[N, C]` (or `[N, ...]`) features, row i belongs to voxel coords[i].
    batch_size: number of batch items (may exceed the largest batch index + 1: empty items are allowed);
        computed from coords when not given.
    resolution: the grid resolution R the coords live in (optional metadata, doubled by `subdivide`).
    cache: the structure's `SpatialCache` (pass it only when `coords` is the same structure).
    """

    def __init__(
        self,
        coords: torch.Tensor,
        feats: torch.Tensor,
        *,
        batch_size: int | None = None,
        resolution: int | None = None,
        cache: SpatialCache | None = None,
    ):
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if coords.dtype != torch.int32:
            raise ValueError(f"coords must be int32, got {coords.dtype}")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
        if feats.device != coords.device:
            raise ValueError(f"feats on {feats.device} but coords on {coords.device}")
        self.coords = coords
        self.feats = feats
        if batch_size is None:
            batch_size = int(coords[:, 0].max().item()) + 1 if len(coords) else 0
        self.batch_size = batch_size
        self.resolution = resolution
        self.cache = cache if cache is not None else SpatialCache()

    # ------------------------------------------------------------------ basic properties
    def __len__(self) -> int:
        return self.coords.shape[0]

    def __repr__(self) -> str:
        return (
            f"SparseTensor(N={len(self)}, feats={tuple(self.feats.shape)}, dtype={self.feats.dtype}, "
            f"batch_size={self.batch_size}, resolution={self.resolution}, device={self.device})"
        )

    @property
    def device(self) -> torch.device:
        return self.coords.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def shape(self) -> torch.Size:
        return self.feats.shape

    # ------------------------------------------------------------------ batch layout
    @property
    def batch_counts(self) -> torch.Tensor:
        """`[B]` int64 number of voxels of each batch item (cached)."""
        return self.cache.get_or_compute(
            "batch_counts", lambda: torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size)
        )

    @property
    def batch_offsets(self) -> torch.Tensor:
        """`[B + 1]` int64: batch item b occupies rows batch_offsets[b] : batch_offsets[b + 1] (cached)."""

        def compute() -> torch.Tensor:
            offsets = torch.zeros(self.batch_size + 1, dtype=torch.int64, device=self.device)
            offsets[1:] = torch.cumsum(self.batch_counts, 0)
            return offsets

        return self.cache.get_or_compute("batch_offsets", compute)

    @property
    def layout(self) -> list[slice]:
        """Row slice of each batch item (cached; one host sync the first time)."""

        def compute() -> list[slice]:
            o = self.batch_offsets.tolist()
            return [slice(o[b], o[b + 1]) for b in range(self.batch_size)]

        return self.cache.get_or_compute("layout", compute)

    @property
    def spatial_extent(self) -> int:
        """1 + the largest x, y or z coordinate (cached; at least 1)."""
        return self.cache.get_or_compute(
            "spatial_extent", lambda: int(self.coords[:, 1:].max().item()) + 1 if len(self) else 1
        )

    # ------------------------------------------------------------------ new tensors
    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None) -> SparseTensor:
        """Same structure (and cache) with new `feats` `[N, C']`; or a new structure when `coords` is given."""
        if coords is None:
            return SparseTensor(
                self.coords, feats, batch_size=self.batch_size, resolution=self.resolution, cache=self.cache
            )
        return SparseTensor(coords, feats, batch_size=self.batch_size, resolution=self.resolution)

    def select(self, mask: torch.Tensor) -> SparseTensor:
        """The voxels where `mask` `[N]` (bool) is true: a new structure, still sorted, same batch size."""
        return SparseTensor(
            self.coords[mask], select_rows(self.feats, mask), batch_size=self.batch_size, resolution=self.resolution
        )

    def unbind(self) -> list[SparseTensor]:
        """One single-item SparseTensor (batch index 0) per batch item."""
        out = []
        for s in self.layout:
            c = self.coords[s].clone()
            c[:, 0] = 0
            out.append(SparseTensor(c, self.feats[s], batch_size=1, resolution=self.resolution))
        return out

    def to(self, *args, **kwargs) -> SparseTensor:
        """Features cast/moved like `Tensor.to`; coords follow the device (the cache is dropped on a move)."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.device:
            return self.replace(feats)
        return SparseTensor(
            self.coords.to(feats.device), feats, batch_size=self.batch_size, resolution=self.resolution
        )


def sparse_cat(tensors: Sequence[SparseTensor], dim: int = -1) -> SparseTensor:
    """Concatenate the features of tensors of one structure along a feature dim: `[N, C1] + [N, C2] -> [N, C1+C2]`."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.cache is not first.cache and not torch.equal(t.coords, first.coords):
            raise ValueError("sparse_cat needs tensors of the same structure")
    if dim == 0 or dim == -first.feats.dim():
        raise ValueError("sparse_cat concatenates features; use sparse_batch_cat to join voxel sets")
    return first.replace(torch.cat([t.feats for t in tensors], dim=dim))


def sparse_batch_cat(tensors: Sequence[SparseTensor]) -> SparseTensor:
    """Join tensors into one batch: the batch items of tensors[1] follow those of tensors[0], and so on."""
    coords, offset = [], 0
    for t in tensors:
        c = t.coords.clone()
        c[:, 0] += offset
        coords.append(c)
        offset += t.batch_size
    resolutions = {t.resolution for t in tensors}
    return SparseTensor(
        torch.cat(coords),
        torch.cat([t.feats for t in tensors]),
        batch_size=offset,
        resolution=resolutions.pop() if len(resolutions) == 1 else None,
    )


def sort_coords(coords: torch.Tensor) -> torch.Tensor:
    """`[N]` int64 permutation that sorts `coords` `[N, 4]` lexicographically (the SparseTensor order)."""
    extent = int(coords[:, 1:].max().item()) + 1 if len(coords) else 1
    return torch.argsort(linearize(coords, extent))
