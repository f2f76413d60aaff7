"""Exact sparse voxelisation of a triangle mesh, and the voxel pyramid used as GT occupancy.

A voxel (i, j, k) of a grid of resolution R is the *half-open* cube [i, i+1) x [j, j+1) x [k, k+1) in grid
units (grid coordinate g = (x + 0.5) * R), closed on the grid's outer faces (voxel R - 1 is [R - 1, R] along
that axis). Every point of the cube [0, R]^3 lies in exactly one voxel, min(floor(g), R - 1) per axis: the
rule by which the encoder's local PointNet assigns surface samples (`focusing.models.pointnet`). A voxel is
active when its cube and a (closed) triangle of the mesh share at least one point. So a triangle lying in the
grid plane x = i activates the voxels x = i only (not i - 1, which it merely touches: those would hold no
sample point), an edge on a grid line one voxel of the 4 around it, a vertex on a grid corner one of 8.
Triangles outside [0, R]^3 are dropped.

Why half-open cubes: the cubes of the 8 children of a parent voxel tile the parent's cube exactly (also at the
closed outer faces), so exact voxelisation commutes with coarsening:

    voxelize(mesh, R / 2) == unique(voxelize(mesh, R) // 2)            (R even)

Every fine voxel's parent is active and every active parent has an active child. `voxel_pyramid` relies on
this (it voxelises once at R and coarsens), and the tests check it against independent voxelisations.

Triangle/cube overlap is the separating-axis test (Akenine-Moeller): 3 cube face normals, the triangle normal
and the 9 cross products of triangle edges with the cube axes. A half-open cube is the union of the closed cubes
whose open faces are pulled in by e > 0, so it meets a (compact) triangle iff one of them does, and as e -> 0+
the SAT of the pulled-in cube becomes: on axis a, the cube's projection [-r, r] loses its upper end when a has
a positive component along an open axis, its lower end when it has a negative one. The test is exact up to float64 rounding, also for degenerate (zero-area) triangles, which
reduce to segments. Candidates come from each triangle's grid bounding box. Large triangles start on a coarser
block grid (blocks of 2^l voxels, tested as slightly inflated closed cubes, hence conservatively) and are
refined 2x per level, so a triangle spanning the whole grid costs O(its voxels), not O(its bounding box). Work
runs in chunks of at most `chunk` (triangle, block) pairs, so memory stays bounded (a 1M-face mesh at R = 1024
fits in a few GB; see benchmarks/bench_prepare.py).
"""

from __future__ import annotations

import itertools

import torch

from focusing.data.grid import CORNER_OFFSETS
from focusing.io.mesh import Mesh

START_BLOCKS_PER_AXIS = 4
"""A triangle starts on the finest block grid where its bounding box spans at most this many blocks per axis."""

COARSE_MARGIN = 1e-6
"""Inflation (grid units) of coarse blocks, so float rounding can never drop a block holding an active voxel."""



def default_chunk(device: torch.device) -> int:
    """(triangle, block) pairs tested at once: ~0.1 GB of temporaries on CPU, ~1 GB on CUDA."""
    return 1 << 21 if device.type == "cuda" else 1 << 17


def triangle_box_overlap(
    tri: torch.Tensor, half: float | torch.Tensor, open_top: torch.Tensor | None = None
) -> torch.Tensor:
    """Separating-axis test of closed triangles against axis-aligned cubes centred at the origin.

    tri: [P, 3, 3] float (vertex, xyz), already translated so the cube centre is the origin; half: the cube's
    half side (scalar or [P]); open_top: bool [P, 3], the axes along which the cube is half-open [-h, h)
    (default: none, a closed cube). Returns bool [P]: True where they share a point (touching a closed side
    counts, touching an open one does not).
    """
    half = torch.as_tensor(half, dtype=tri.dtype, device=tri.device)
    half = half.reshape(-1, 1) if half.ndim else half  # broadcasts against [P, 3]
    edges = tri.roll(-1, dims=1) - tri  # [P, 3, 3]: e_i = v_{i+1} - v_i
    normal = torch.linalg.cross(edges[:, 0], edges[:, 1])
    k, l = [1, 2, 0], [2, 0, 1]
    ek, el = edges[:, :, k], edges[:, :, l]  # [P, edge, axis]
    # Projections (lo, hi) of the triangle and radius r of the cube on each of the 13 axes, [P, 13].
    # 3 cube face normals: the triangle's extent against [-h, h] on each axis.
    lo, hi, radius = [tri.amin(1)], [tri.amax(1)], [half.expand(len(tri), 3)]
    # Triangle normal n: the triangle projects to the point n . v0, the cube to [-r, r], r = h (|nx|+|ny|+|nz|).
    plane = (normal * tri[:, 0]).sum(1, keepdim=True)
    lo.append(plane), hi.append(plane), radius.append((half * normal.abs()).sum(1, keepdim=True))
    # 9 axes e_i x u_j. For u_j with the other two axes (k, l) in cyclic order, w . (e_i x u_j) = e_l w_k - e_k w_l.
    # v_i and v_{i+1} project to the same value, so the triangle projects to [p(v_i), p(v_{i+2})] (unordered).
    p0 = el * tri[:, :, k] - ek * tri[:, :, l]
    opposite = tri.roll(-2, dims=1)
    p2 = el * opposite[:, :, k] - ek * opposite[:, :, l]
    lo.append(torch.minimum(p0, p2).flatten(1)), hi.append(torch.maximum(p0, p2).flatten(1))
    radius.append(((ek.abs() + el.abs()) * (half[:, :, None] if half.ndim else half)).flatten(1))
    lo, hi, radius = torch.cat(lo, 1), torch.cat(hi, 1), torch.cat(radius, 1)
    if open_top is None:
        return ((lo <= radius) & (hi >= -radius)).all(1)
    # The axes themselves [P, 13, 3], their components kept only along the open axes.
    unit = torch.eye(3, dtype=tri.dtype, device=tri.device).expand(len(tri), 3, 3)
    cross = torch.zeros(len(tri), 3, 3, 3, dtype=tri.dtype, device=tri.device)  # [P, edge, u_j, xyz]
    j = torch.arange(3)
    cross[:, :, j, k], cross[:, :, j, l] = el, -ek
    axes = torch.cat([unit, normal[:, None], cross.flatten(1, 2)], 1) * open_top[:, None, :].to(tri.dtype)
    upper = torch.where((axes > 0).any(-1), lo < radius, lo <= radius)
    lower = torch.where((axes < 0).any(-1), hi > -radius, hi >= -radius)
    return (upper & lower).all(1)


def _keys(xyz: torch.Tensor, resolution: int) -> torch.Tensor:
    """[N, 3] int voxel coordinates -> [N] int64 keys that sort lexicographically (`grid.linearize` without the
    batch column, which the hot loop would otherwise have to allocate)."""
    xyz = xyz.to(torch.int64)
    return (xyz[:, 0] * resolution + xyz[:, 1]) * resolution + xyz[:, 2]


def _unkeys(keys: torch.Tensor, resolution: int) -> torch.Tensor:
    """Inverse of `_keys`: [N] int64 -> [N, 3] int32."""
    return torch.stack([keys // (resolution * resolution), keys // resolution % resolution, keys % resolution], 1).to(
        torch.int32
    )


def _bbox_blocks(ids: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block of each triangle's block bounding box: (triangle index [P] int64, block [P, 3] int64).

    ids: [T] triangle indices; lo, hi: [T, 3] inclusive block ranges.
    """
    span = hi - lo + 1
    count = span.prod(1)
    tri = torch.repeat_interleave(ids, count)
    local = torch.arange(len(tri), device=ids.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    span, lo = torch.repeat_interleave(span, count, dim=0), torch.repeat_interleave(lo, count, dim=0)
    offset = torch.stack([local % span[:, 0], local // span[:, 0] % span[:, 1], local // (span[:, 0] * span[:, 1])], 1)
    return tri, lo + offset


def _descend(
    grid_tris: torch.Tensor, tri: torch.Tensor, block: torch.Tensor, level: int, resolution: int, chunk: int, out: list
) -> None:
    """Test (triangle, block) pairs at block size 2^level (inflated closed blocks; at level 0 the exact half-open
    voxels); refine survivors down to voxels.

    grid_tris: [F, 3, 3] float64 triangles in grid units; tri: [P] int64 triangle index; block: [P, 3] int64
    block coordinates. Appends (voxel keys [K] int64, triangle indices [K]) of overlapping pairs to `out`.
    """
    size = 1 << level
    half = 0.5 * size + (COARSE_MARGIN if level else 0.0)
    for start in range(0, len(tri), chunk):
        t, b = tri[start : start + chunk], block[start : start + chunk]
        centre = (b.to(torch.float64) + 0.5) * size
        open_top = b < resolution - 1 if level == 0 else None  # the last voxel is closed on the outer face
        keep = triangle_box_overlap(grid_tris[t] - centre[:, None, :], half, open_top)
        t, b = t[keep], b[keep]
        if level == 0:
            out.append((_keys(b, resolution), t))
            continue
        children = (b[:, None, :] * 2 + CORNER_OFFSETS.to(b.device, torch.int64)).reshape(-1, 3)  # 8 sub-blocks
        inside = ((children << (level - 1)) < resolution).all(1)
        _descend(grid_tris, t.repeat_interleave(8)[inside], children[inside], level - 1, resolution, chunk, out)


def _overlapping_pairs(mesh: Mesh, resolution: int, device: torch.device, chunk: int):
    """Yield, per group of triangles, lists of (voxel keys [K] int64, triangle indices [K] int64) of every
    (voxel, triangle) pair whose voxel and triangle meet. Memory: O(chunk) plus one group's pairs."""
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float64, device=device)
    grid_tris = (vertices[torch.as_tensor(mesh.faces, device=device)] + 0.5) * resolution  # [F, 3, 3]
    # Half-open cubes: coordinate g lies in voxel min(floor(g), R - 1), for 0 <= g <= R.
    g_lo, g_hi = grid_tris.amin(1), grid_tris.amax(1)
    lo = (g_lo.floor() - (g_lo == resolution).to(g_lo.dtype)).clamp(min=0).to(torch.int64)  # [F, 3]
    hi = g_hi.floor().clamp(max=resolution - 1).to(torch.int64)
    valid = ((hi >= lo) & (lo < resolution)).all(1)
    start_level = torch.zeros(len(lo), dtype=torch.int64, device=device)
    while True:  # smallest l with at most START_BLOCKS_PER_AXIS blocks of 2^l voxels per axis (<= log2 R steps)
        level = start_level[:, None]
        wide = ((hi >> level) - (lo >> level) + 1).amax(1) > START_BLOCKS_PER_AXIS
        if not wide.any():
            break
        start_level += wide.to(torch.int64)
    for level in range(int(start_level.max()) if len(lo) else -1, -1, -1):
        ids = torch.nonzero(valid & (start_level == level)).squeeze(1)
        blo, bhi = lo[ids] >> level, hi[ids] >> level
        count = (bhi - blo + 1).prod(1)  # candidate blocks per triangle, <= START_BLOCKS_PER_AXIS^3
        # Groups of consecutive triangles with at most `chunk` (+ one triangle's) candidates each.
        cuts = torch.searchsorted(count.cumsum(0), torch.arange(0, int(count.sum()), chunk, device=device), right=True)
        cuts = torch.unique(torch.cat([cuts, cuts.new_tensor([len(ids)])])).tolist()
        for first, last in itertools.pairwise(cuts):
            tri, block = _bbox_blocks(ids[first:last], blo[first:last], bhi[first:last])
            found: list[tuple[torch.Tensor, torch.Tensor]] = []
            _descend(grid_tris, tri, block, level, resolution, chunk, found)
            if found:
                yield found


def voxelize(mesh: Mesh, resolution: int, *, device: str | torch.device | None = None, chunk: int | None = None):
    """The exact set of voxels at resolution R whose (half-open) cube meets a triangle of `mesh` (normalised frame).

    Returns int32 [N, 3] (x, y, z) on `device` (default CPU), sorted lexicographically, unique. Prepend a
    batch column for the `[N, 4]` sparse layout with `with_batch`.
    """
    device = torch.device(device or "cpu")
    groups = _overlapping_pairs(mesh, resolution, device, chunk or default_chunk(device))
    keys = [torch.unique(torch.cat([k for k, _ in found])) for found in groups]
    if not keys:
        return torch.zeros((0, 3), dtype=torch.int32, device=device)
    return _unkeys(torch.unique(torch.cat(keys)), resolution)


def voxel_triangle_pairs(
    mesh: Mesh, resolution: int, *, device: str | torch.device | None = None, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (voxel, triangle) pair whose (half-open) cube and triangle meet, sorted by voxel: (voxel keys [P]
    int64 = (x R + y) R + z, triangle indices [P] int64). The spatial index of `focusing.data.distance`."""
    device = torch.device(device or "cpu")
    pairs = [p for found in _overlapping_pairs(mesh, resolution, device, chunk or default_chunk(device)) for p in found]
    if not pairs:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    keys, tri = torch.cat([k for k, _ in pairs]), torch.cat([t for _, t in pairs])
    order = torch.argsort(keys, stable=True)
    return keys[order], tri[order]


def coarsen(coords: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Parents of voxels `coords` [N, 3] int on the grid `factor` times coarser: int32 [M, 3], sorted, unique."""
    parents = torch.div(coords.to(torch.int64), factor, rounding_mode="floor")
    extent = int(parents.max()) + 1 if len(parents) else 1
    return _unkeys(torch.unique(_keys(parents, extent)), extent)


def voxel_pyramid(mesh: Mesh, resolution: int, *, device: str | torch.device | None = None) -> dict[int, torch.Tensor]:
    """Active voxels at R/4 (latent grid), R/2 and R: {R // 4: [N0, 3], R // 2: [N1, 3], R: [N2, 3]} int32, sorted.

    Voxelises exactly at R and coarsens (equal to exact voxelisation at each level, see the module docstring),
    so the levels are consistent: every voxel's parent is active one level up. R must be divisible by 4.
    """
    if resolution % 4 or resolution < 4:
        raise ValueError(f"pyramid resolution must be a positive multiple of 4, got {resolution}")
    fine = voxelize(mesh, resolution, device=device)
    mid = coarsen(fine)
    return {resolution // 4: coarsen(mid), resolution // 2: mid, resolution: fine}


def with_batch(coords: torch.Tensor, batch: int = 0) -> torch.Tensor:
    """[N, 3] (x, y, z) -> int32 [N, 4] (batch, x, y, z), the sparse-tensor layout."""
    column = torch.full((len(coords), 1), batch, dtype=torch.int32, device=coords.device)
    return torch.cat([column, coords.to(torch.int32)], 1)
