"""`ShapeDataset`: the items of a `focusing prepare` cache as dicts of tensors, and `collate_shapes` for batches.

An item (R = the cache's resolution, all geometry in the normalised frame [-0.5, 0.5]^3):

    id             str
    points         f32 [P, 3]   surface samples (all, or a random subset of `points` of them)
    normals        f32 [P, 3]   their unit face normals
    voxels_latent  i32 [N0, 3]  active voxels at R/4, the latent grid (sorted)
    voxels_mid     i32 [N1, 3]  active voxels at R/2 (GT occupancy of the first upsampling block)
    voxels         i32 [N2, 3]  active voxels at R (GT occupancy of the second upsampling block)
    corners        i32 [M, 3]   corners (0..R) of `voxels`, sorted, as `focusing.data.grid.voxel_corners`
    tsdf           f32 [M]      truncated SDF at `corners`, normalised units, negative inside
    vertices       f32 [V, 3]   the normalised GT mesh
    faces          i64 [F, 3]
    normalization  f64 [4]      (cx, cy, cz, scale): x_norm = (x_source - c) * scale
    resolution     i64 []       R
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from focusing.data.prepare import read_index
from focusing.errors import InputError

LEVEL_KEYS = ("voxels_latent", "voxels_mid", "voxels")
"""Item keys of the pyramid levels R/4, R/2, R."""


class ShapeDataset(torch.utils.data.Dataset):
    """Reads a cache written by `focusing prepare` (all ranks' index files merged; items whose file is gone are
    left out).

    points: if given, each item returns a random subset of that many surface samples, drawn from a generator
    seeded by (seed, epoch, index): reproducible, and different per epoch after `set_epoch`.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, points: int | None = None, seed: int = 0):
        self.cache_dir = Path(cache_dir)
        if not self.cache_dir.is_dir():
            raise InputError(self.cache_dir, "no such cache folder")
        entries = read_index(self.cache_dir)
        self.entries = [e for e in entries if e["status"] == "ok" and (self.cache_dir / e["file"]).is_file()]
        resolutions = {e["resolution"] for e in self.entries}
        if len(resolutions) > 1:
            raise InputError(self.cache_dir, f"cache mixes resolutions {sorted(resolutions)}")
        self.resolution = resolutions.pop() if resolutions else None
        self.points = points
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        from safetensors.torch import load_file

        entry = self.entries[index]
        t = load_file(str(self.cache_dir / entry["file"]))
        r = int(entry["resolution"])
        points, normals = t["points"], t["normals"]
        if self.points is not None and self.points < len(points):
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % (1 << 63))
            pick = torch.randperm(len(points), generator=g)[: self.points]
            points, normals = points[pick], normals[pick]
        levels = sorted(entry["levels"])
        return {
            "id": entry["id"],
            "points": points,
            "normals": normals,
            **{key: t[f"voxels_{level}"].to(torch.int32) for key, level in zip(LEVEL_KEYS, levels)},
            "corners": t["corners"].to(torch.int32),
            "tsdf": t["tsdf"].to(torch.float32) / r,
            "vertices": t["vertices"],
            "faces": t["faces"].to(torch.int64),
            "normalization": t["normalization"],
            "resolution": torch.tensor(r),
        }


def collate_shapes(batch: list[dict]) -> dict:
    """A batch of items: voxels / corners become sparse [sum N, 4] int32 (batch, x, y, z) with each batch
    contiguous, tsdf is concatenated [sum M], points / normals stacked [B, P, 3] (items must have equal P,
    e.g. with `ShapeDataset(points=...)`), meshes stay lists, normalization [B, 4], resolution [B]."""
    out: dict = {"id": [b["id"] for b in batch]}
    for key in (*LEVEL_KEYS, "corners"):
        out[key] = torch.cat(
            [torch.cat([torch.full((len(b[key]), 1), i, dtype=torch.int32), b[key]], 1) for i, b in enumerate(batch)]
        )
    out["tsdf"] = torch.cat([b["tsdf"] for b in batch])
    for key in ("points", "normals", "normalization", "resolution"):
        out[key] = torch.stack([b[key] for b in batch])
    out["vertices"] = [b["vertices"] for b in batch]
    out["faces"] = [b["faces"] for b in batch]
    return out
