"""Exact truncated unsigned distance from points to a triangle mesh, with the voxel grid as spatial index.

`TriangleGrid` buckets the triangles of a normalised mesh by the voxels of a grid of resolution G that they
touch (the exact (voxel, triangle) pairs of `focusing.data.voxelize`). For a query q (grid units) and m = 1,
2, ...: the candidates are the triangles in the voxels [floor(q - m), ceil(q + m) - 1]^3, which contain every
surface point closer than m to q. If the nearest candidate is closer than m, it is the exact distance; else
q goes to the next m, up to ceil(max_distance), where whatever is left is at least max_distance away. A grid
corner needs only its 8 surrounding voxels while its distance is below one voxel, which is the usual case for
the corners of active voxels (`corner_tsdf`); corners up to sqrt(3) voxels away take a second pass.

Point-triangle distances are evaluated exactly (float64) through the nearest point: the projection onto the
plane when the point projects inside the triangle, else the nearest point of the three edges (segments), which
also covers degenerate slivers. `closest` also returns that point (the TSDF's sign needs it).
"""

from __future__ import annotations

import itertools
import math

import torch

from focusing.data.vec3 import cross, dot, norm
from focusing.data.voxelize import voxel_triangle_pairs
from focusing.io.mesh import Mesh

FRAME_TOLERANCE = 1e-9


def _segment_closest(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., 3] nearest points to p on segments ab (all [..., 3])."""
    ab = b - a
    t = (dot(p - a, ab) / dot(ab, ab).clamp_min(1e-300)).clamp(0.0, 1.0)
    return a + t[..., None] * ab


def closest_point_on_triangle(p: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Exact nearest points [..., 3] to p [..., 3] on closed triangles tri [..., 3, 3]: the projection onto the
    plane when it falls inside the triangle, else the nearest of the three edges (also for degenerate slivers)."""
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    n = cross(b - a, c - a)
    nn = dot(n, n)
    inside = nn > 0
    for u, v in ((a, b), (b, c), (c, a)):  # p projects inside iff it is left of every edge (seen along n)
        inside = inside & (dot(n, cross(v - u, p - u)) >= 0)
    best = _segment_closest(p, a, b)
    for u, v in ((b, c), (c, a)):
        q = _segment_closest(p, u, v)
        best = torch.where((norm(p - q) < norm(p - best))[..., None], q, best)
    plane = p - (dot(p - a, n) / nn.clamp_min(1e-300))[..., None] * n
    return torch.where(inside[..., None], plane, best)


def point_triangle_distance(p: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance [...] from points p [..., 3] to closed triangles tri [..., 3, 3]."""
    return norm(p - closest_point_on_triangle(p, tri))


def _ranges(start: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand ranges [start_i, start_i + count_i): (range index [S], value [S]), S = sum(count)."""
    owner = torch.repeat_interleave(torch.arange(len(count), device=count.device), count)
    return owner, start[owner] + torch.arange(len(owner), device=count.device) - (count.cumsum(0) - count)[owner]


class TriangleGrid:
    """Triangles of a normalised mesh (inside [-0.5, 0.5]^3) bucketed by the voxels they touch at resolution G.

    Memory: the (voxel, triangle) pairs (16 bytes each; about 2-4 per triangle when triangles are smaller than
    a voxel, about area * G^2 for large ones) plus the triangles in grid units.
    """

    def __init__(self, mesh: Mesh, resolution: int, *, device: str | torch.device | None = None):
        if len(mesh.vertices) and (abs(mesh.vertices).max() > 0.5 + FRAME_TOLERANCE):
            raise ValueError("the mesh must lie in the normalised frame [-0.5, 0.5]^3 (focusing.io.normalize)")
        self.device = torch.device(device or "cpu")
        self.resolution = resolution
        keys, self.cell_tri = voxel_triangle_pairs(mesh, resolution, device=self.device)
        self.cell_keys, self.cell_count = torch.unique_consecutive(keys, return_counts=True)
        self.cell_start = self.cell_count.cumsum(0) - self.cell_count
        vertices = torch.as_tensor(mesh.vertices, dtype=torch.float64, device=self.device)
        self.tris = (vertices[torch.as_tensor(mesh.faces, device=self.device)] + 0.5) * resolution

    def distance(self, g: torch.Tensor, max_distance: float, *, budget: int | None = None) -> torch.Tensor:
        """Exact distances [N] float64 (grid units) from points g [N, 3] (grid units), clamped to max_distance.

        budget: (point, cell) and (point, triangle) pairs handled at once.
        """
        return self.closest(g, max_distance, budget=budget)[0]

    def closest(
        self, g: torch.Tensor, max_distance: float, *, budget: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`distance` and the nearest surface points [N, 3] float64 (grid units; NaN where the distance is
        max_distance or more, i.e. clamped)."""
        if not math.isfinite(max_distance) or max_distance <= 0:
            raise ValueError(f"max_distance must be positive and finite, got {max_distance}")
        g = g.to(self.device, torch.float64).reshape(-1, 3)
        budget = budget or (1 << 22 if self.device.type == "cuda" else 1 << 20)
        out = torch.full((len(g),), float(max_distance), dtype=torch.float64, device=self.device)
        nearest = torch.full((len(g), 3), math.nan, dtype=torch.float64, device=self.device)
        todo = torch.arange(len(g), device=self.device)  # points not resolved yet
        passes = math.ceil(max_distance)
        for m in range(1, passes + 1):
            left = []
            step = max(1, budget // (2 * m + 1) ** 3)
            for s in range(0, len(todo), step):
                idx = todo[s : s + step]
                d, q = self._nearest(g[idx], m, budget)
                resolved = (d < m) | (m == passes)
                near = resolved & (d < max_distance)
                out[idx[resolved]] = d[resolved].clamp(max=max_distance)
                nearest[idx[near]] = q[near]
                left.append(idx[~resolved])
            todo = torch.cat(left) if left else todo
        return out, nearest

    def _nearest(self, g: torch.Tensor, m: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Min distance [n] from points g [n, 3] to the triangles in voxels [floor(g - m), ceil(g + m) - 1]^3
        (inf where there are none) and a nearest point [n, 3] (NaN where none)."""
        r = self.resolution
        lo = (g - m).floor().clamp(0, r - 1).to(torch.int64)
        hi = ((g + m).ceil() - 1).clamp(0, r - 1).to(torch.int64)
        span = (hi - lo + 1).clamp(min=0)
        point, local = _ranges(torch.zeros(len(g), dtype=torch.int64, device=g.device), span.prod(1))
        sp, base = span[point], lo[point]
        cell = base + torch.stack([local % sp[:, 0], local // sp[:, 0] % sp[:, 1], local // (sp[:, 0] * sp[:, 1])], 1)
        key = (cell[:, 0] * r + cell[:, 1]) * r + cell[:, 2]
        slot = torch.searchsorted(self.cell_keys, key).clamp(max=max(len(self.cell_keys) - 1, 0))
        hit = self.cell_keys[slot] == key if len(self.cell_keys) else torch.zeros_like(key, dtype=torch.bool)
        point, slot = point[hit], slot[hit]
        best = torch.full((len(g),), math.inf, dtype=torch.float64, device=g.device)
        nearest = torch.full((len(g), 3), math.nan, dtype=torch.float64, device=g.device)
        count = self.cell_count[slot]
        # Pairs in groups of about `budget`: consecutive (point, cell) entries whose triangle counts add up.
        cuts = torch.searchsorted(
            count.cumsum(0), torch.arange(0, int(count.sum()), budget, device=g.device), right=True
        )
        cuts = torch.unique(torch.cat([cuts, cuts.new_tensor([len(count)])])).tolist()
        for a, b in itertools.pairwise(cuts):
            which, pair = _ranges(self.cell_start[slot[a:b]], count[a:b])
            owner = point[a:b][which]
            q = closest_point_on_triangle(g[owner], self.tris[self.cell_tri[pair]])
            d = norm(g[owner] - q)
            group = torch.full_like(best, math.inf).scatter_reduce_(0, owner, d, reduce="amin")
            win = (d == group[owner]) & (d < best[owner])  # a nearest pair of this group that improves
            best = torch.minimum(best, group)
            nearest[owner[win]] = q[win]
        return best, nearest


def surface_distance(
    mesh: Mesh,
    points,
    max_distance: float,
    *,
    resolution: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Exact unsigned distances [N] float64 from points [N, 3] to a normalised mesh, clamped to max_distance.

    resolution: the index grid (default: max_distance spans about 2 voxels, capped to 512). Runs on `device`
    (default: the points' device, or CPU for arrays).
    """
    if device is None:
        device = points.device if isinstance(points, torch.Tensor) else "cpu"
    resolution = resolution or max(4, min(512, math.ceil(2.0 / max_distance)))
    grid = TriangleGrid(mesh, resolution, device=device)
    g = (torch.as_tensor(points, dtype=torch.float64, device=grid.device).reshape(-1, 3) + 0.5) * resolution
    return grid.distance(g, max_distance * resolution) / resolution
