"""Oriented surface sampling: area-weighted points on the triangles, each with its face's unit normal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from focusing.io.mesh import Mesh

DEFAULT_POINTS = 819_200  # the anchors' (TripoSF/TRELLIS) input point count


@dataclass
class SurfaceSamples:
    """points: float32 [N, 3]; normals: float32 [N, 3] unit face normals; face_index: int64 [N]."""

    points: np.ndarray
    normals: np.ndarray
    face_index: np.ndarray


def sample_surface(mesh: Mesh, n: int = DEFAULT_POINTS, seed: int = 0) -> SurfaceSamples:
    """Sample `n` points uniformly by area (deterministic for a given seed).

    Barycentric coordinates use the square-root warp (u = 1 - sqrt(r1), v = sqrt(r1) (1 - r2)), which is
    uniform on each triangle. Points are computed in float64 then stored as float32.
    """
    rng = np.random.default_rng(seed)
    cross = mesh.face_cross()
    double_area = np.linalg.norm(cross, axis=1)
    cdf = np.cumsum(double_area)
    face = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    face = np.minimum(face, len(cdf) - 1)
    r1 = np.sqrt(rng.random(n))
    r2 = rng.random(n)
    tri = mesh.vertices[mesh.faces[face]]
    w0 = 1.0 - r1
    w1 = r1 * (1.0 - r2)
    w2 = r1 * r2
    points = w0[:, None] * tri[:, 0] + w1[:, None] * tri[:, 1] + w2[:, None] * tri[:, 2]
    normals = cross[face] / double_area[face, None]
    return SurfaceSamples(points.astype(np.float32), normals.astype(np.float32), face.astype(np.int64))
