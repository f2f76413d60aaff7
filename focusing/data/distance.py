"""Exact unsigned distance from points to a triangle mesh, with a KD-tree candidate search.

Every triangle is covered by `proxies`: the triangle itself, or, when its bounding radius rho_T (max distance
from centroid to a vertex) exceeds `proxy_radius`, the n^2 congruent sub-triangles of its n-fold uniform
subdivision (n = ceil(rho_T / proxy_radius)), each of bounding radius rho_T / n. A proxy with centroid c and
radius rho bounds the distance of its triangle from below: d(q, T) >= |q - c| - rho. So for a query q with
the k nearest proxy centroids (pykdtree), exact distances U to their triangles and D_k the k-th centroid
distance, every unseen triangle is farther than D_k - rho_max; once D_k - rho_max > min(U, max_distance), the
answer min(U, max_distance) is exact. Queries that fail the test are re-run with 2k neighbours. Beyond
`max_distance` only "farther than max_distance" is certified, which is all a truncated SDF needs.

Point-triangle distances are evaluated exactly (float64): the plane distance when the point projects inside
the triangle, else the nearest of the three edges (segments), which also covers degenerate slivers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from focusing.data.vec3 import cross, dot, norm
from focusing.io.mesh import Mesh


def _segment_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[...] distance from points p to segments ab (all [..., 3])."""
    ab, ap = b - a, p - a
    t = (dot(ap, ab) / dot(ab, ab).clamp_min(1e-300)).clamp(0.0, 1.0)
    return norm(ap - t[..., None] * ab)


def point_triangle_distance(p: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance [...] from points p [..., 3] to closed triangles tri [..., 3, 3]."""
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    n = cross(b - a, c - a)
    nn = dot(n, n)
    inside = nn > 0
    for u, v in ((a, b), (b, c), (c, a)):  # p projects inside iff it is left of every edge (seen along n)
        inside = inside & (dot(n, cross(v - u, p - u)) >= 0)
    plane = dot(p - a, n).abs() / nn.clamp_min(1e-300).sqrt()
    edges = torch.minimum(torch.minimum(_segment_distance(p, a, b), _segment_distance(p, b, c)), _segment_distance(p, c, a))
    return torch.where(inside, torch.minimum(plane, edges), edges)


def triangle_proxies(tris: np.ndarray, proxy_radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cover triangles [F, 3, 3] by proxies of bounding radius <= proxy_radius (see module docstring).

    Returns (centroid [P, 3] float64, radius [P] float64, triangle index [P] int64).
    """
    centroid = tris.mean(1)
    rho = np.linalg.norm(tris - centroid[:, None], axis=2).max(1)
    n = np.maximum(1, np.ceil(rho / proxy_radius)).astype(np.int64)
    tri = np.repeat(np.arange(len(tris)), n * n)
    local = np.arange(len(tri)) - np.repeat(np.cumsum(n * n) - n * n, n * n)
    m = n[tri]
    i, j = local // m, local % m
    # Cell (i, j) of the n x n square: "up" sub-triangle (i, j) if i + j < n, else the "down" sub-triangle
    # (n-1-i, n-1-j). Centroids in the (v1 - v0, v2 - v0) frame, in units of 1/n: up (i+1/3, j+1/3), down
    # (i'+2/3, j'+2/3).
    up = i + j < m
    s = np.where(up, i + 1 / 3, m - 1 - i + 2 / 3) / m
    t = np.where(up, j + 1 / 3, m - 1 - j + 2 / 3) / m
    v = tris[tri]
    centres = v[:, 0] + s[:, None] * (v[:, 1] - v[:, 0]) + t[:, None] * (v[:, 2] - v[:, 0])
    return centres, rho[tri] / m, tri


def surface_distance(
    mesh: Mesh,
    points,
    max_distance: float = math.inf,
    *,
    proxy_radius: float | None = None,
    k: int = 8,
    chunk: int = 1 << 16,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Exact unsigned distances [N] float64 from points [N, 3] to the mesh, clamped to `max_distance`.

    proxy_radius: the largest proxy radius (default max_distance, or twice the median triangle radius when
    unbounded). k: initial number of KD-tree neighbours. Runs the exact distances on `device` (default: the
    points' device), the KD-tree on CPU.
    """
    from pykdtree.kdtree import KDTree

    if device is None:
        device = points.device if isinstance(points, torch.Tensor) else "cpu"
    device = torch.device(device)
    query = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 3).cpu().numpy()
    tris = mesh.vertices[mesh.faces]
    if proxy_radius is None:
        rho = np.linalg.norm(tris - tris.mean(1, keepdims=True), axis=2).max(1)
        proxy_radius = max_distance if math.isfinite(max_distance) else 2 * float(np.median(rho))
    centres, radius, owner = triangle_proxies(tris, proxy_radius)
    rho_max = float(radius.max()) * (1 + 1e-9) + 1e-12  # margin for rounding in the bound
    tree = KDTree(centres)
    tris_dev = torch.as_tensor(tris, dtype=torch.float64, device=device)
    owner_dev = torch.as_tensor(owner, device=device)
    bound = max_distance + rho_max
    out = np.full(len(query), max_distance, dtype=np.float64)
    for s in range(0, len(query), chunk):
        todo = np.arange(s, min(s + chunk, len(query)))
        kk = k
        while len(todo):
            kk = min(kk, len(centres))
            dist, idx = tree.query(query[todo], k=kk, distance_upper_bound=bound if math.isfinite(bound) else None)
            dist, idx = dist.reshape(len(todo), kk), idx.reshape(len(todo), kk).astype(np.int64)
            found = idx < len(centres)
            idx_dev = torch.as_tensor(np.where(found, idx, 0), device=device)
            q = torch.as_tensor(query[todo], device=device)
            d = point_triangle_distance(q[:, None, :], tris_dev[owner_dev[idx_dev]])
            d = torch.where(torch.as_tensor(found, device=device), d, math.inf).amin(1).cpu().numpy()
            limit = np.minimum(d, max_distance)
            done = (dist[:, -1] > limit + rho_max) | (kk == len(centres))  # dist is inf past the bound
            out[todo[done]] = limit[done]
            todo = todo[~done]
            kk *= 2
    return torch.as_tensor(out, device=device)
