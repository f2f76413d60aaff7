"""Truncated signed distance at voxel corners: the target of the TSDF warm-up loss (paper Eq. 5).

    tsdf(q) = sign(q) * min(d(q), t),   t = truncation_voxels / R,

d = exact unsigned distance to the raw (normalised) mesh (`focusing.data.distance`), sign = -1 where the
generalised winding number w(q) > 0.5 (inside), +1 elsewhere (`focusing.data.winding`). No watertight
conversion: open meshes, holes and inner structure keep their raw geometry, and the sign degrades gracefully
(w ~ 0.5 near holes and open boundaries). Values are in normalised units (the [-0.5, 0.5]^3 frame).
"""

from __future__ import annotations

import torch

from focusing.data.distance import TriangleGrid
from focusing.data.winding import winding_number
from focusing.io.mesh import Mesh

DEFAULT_TRUNCATION_VOXELS = 3.0

__all__ = ["DEFAULT_TRUNCATION_VOXELS", "corner_tsdf", "winding_number"]


def corner_tsdf(
    mesh: Mesh,
    corners: torch.Tensor,
    resolution: int,
    truncation_voxels: float = DEFAULT_TRUNCATION_VOXELS,
    *,
    winding_method: str = "auto",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """TSDF float32 [M] at grid corners [M, 3] int (each in 0..R; [M, 4] with a batch column also accepted).

    Corner (i, j, k) sits at (i, j, k) / R - 0.5. Negative inside (winding number > 0.5), positive outside,
    normalised units, clamped to [-t, t] with t = truncation_voxels / R. Runs on `device` (default: the
    corners' device).
    """
    device = torch.device(device or corners.device)
    grid_points = corners[:, -3:].to(device, torch.float64)  # exact grid coordinates: 8 voxels per first pass
    distance = TriangleGrid(mesh, resolution, device=device).distance(grid_points, truncation_voxels) / resolution
    inside = winding_number(mesh, grid_points / resolution - 0.5, method=winding_method, device=device) > 0.5
    return torch.where(inside, -distance, distance).float()
