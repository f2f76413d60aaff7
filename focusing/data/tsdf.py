"""Truncated signed distance at voxel corners: the target of the TSDF warm-up loss (paper Eq. 5).

    tsdf(q) = sign(q) * min(d(q), t),   t = truncation_voxels / R,

d = exact unsigned distance to the raw (normalised) mesh (`focusing.data.distance`). No watertight conversion:
open sheets, holes and inner structure keep their raw geometry. The sign does not depend on how the faces are
wound, and every sheet of the mesh gets a zero crossing:

1. Orientation: `orient_components` re-winds each connected component consistently with positive volume (an
   inward-wound scan, or one with a share of its faces flipped, becomes outward).
2. Mirror test: with p the nearest surface point of a corner q and q' = 2 p - q its mirror image through the
   surface, the winding number w (`focusing.data.winding`) jumps by 1 between the two sides of a sheet
   wherever it is: closed (w 1 | 0), open (about +1/2 | -1/2 on a flat sheet, anything between on a curved
   one) or inside another part (2 | 1). q is inside (negative) when w(q) - w(q') > 1/2, outside when it is
   below -1/2. So an open sheet is signed by its side (the side its normals point away from is negative,
   consistently per connected sheet), a closed part by inside / outside, nested parts each by their own
   surface.
3. Ties (|w(q) - w(q')| <= 1/2: the mirror crossed another surface, e.g. q lies between two touching parts, or
   q is farther from the surface than `sign_voxels`, where p is not searched): inside when w(q) > 1/2, the
   classic rule, so parts glued together stay one solid.
4. Thin shell: parts thinner than a voxel contain no corner, so no corner is inside them. In each surface voxel
   (of the exact voxelisation) whose 8 corners are given and neither inside nor next to an inside corner (26
   neighbours: a surface merely grazing a voxel has its inside next door), the corner nearest to the surface
   gets -SHELL_VOXELS: a zero crossing in every such voxel, a closed shell hugging the thin part that the render
   loss can then move onto it.

Known limits: an open sheet's surface continues past its boundary (the sign of points beyond the rim follows the
mirror through the rim), up to the extent of the corners given; on a non-orientable component the orientation
is consistent only across a spanning tree; thin gaps (two surfaces closer than a voxel with nothing between)
stay closed; a shell's sheets lie up to about the nearest corner's distance (<= sqrt(3)/2 voxel) off the part. Values are in
normalised units (the [-0.5, 0.5]^3 frame).
"""

from __future__ import annotations

import torch

from focusing.data.distance import TriangleGrid
from focusing.data.winding import orient_components, winding_number
from focusing.io.mesh import Mesh

DEFAULT_TRUNCATION_VOXELS = 3.0
SIGN_VOXELS = 3.5
"""Corners up to this far (voxels) get the mirror test: beyond the diagonal of a dilated surface voxel's
neighbour (2 sqrt 3), so every corner of `fit`'s dilated voxels does."""
SIGN_BETA = 1.0
"""Barnes-Hut opening ratio of the winding numbers here: errors of a few 0.01 (vs the jump of 1 it looks for)
at about 2/3 of the cost of the default beta = 2."""
SHELL_VOXELS = 0.1
"""TSDF (voxels) given to the corner nearest to a thin part: small, so the shell's two sheets (crossings on the
edges from that corner) lie within a fraction of a voxel of the corner, i.e. within about half a voxel of the
part."""

__all__ = ["DEFAULT_TRUNCATION_VOXELS", "corner_tsdf", "winding_number"]


def corner_tsdf(
    mesh: Mesh,
    corners: torch.Tensor,
    resolution: int,
    truncation_voxels: float = DEFAULT_TRUNCATION_VOXELS,
    *,
    winding_method: str = "auto",
    sign_voxels: float = SIGN_VOXELS,
    thin_shell: bool = True,
    oriented: bool = False,
    device: str | torch.device | None = None,
    grid: TriangleGrid | None = None,
) -> torch.Tensor:
    """TSDF float32 [M] at grid corners [M, 3] int (each in 0..R; [M, 4] with a batch column also accepted).

    Corner (i, j, k) sits at (i, j, k) / R - 0.5. Negative inside, positive outside by the rule of the module
    docstring, normalised units, clamped to [-t, t] with t = truncation_voxels / R. oriented: the mesh already
    went through `orient_components` (callers that query one mesh many times do it once). Runs on `device`
    (default: the corners' device). grid: a `TriangleGrid` of the mesh at `resolution` on that device, reused
    (the distances do not depend on the winding).
    """
    device = torch.device(device or corners.device)
    mesh = mesh if oriented else orient_components(mesh)
    g = corners[:, -3:].to(device, torch.float64)  # exact grid coordinates: 8 voxels per first pass
    grid = grid if grid is not None else TriangleGrid(mesh, resolution, device=device)
    search = max(truncation_voxels, sign_voxels)
    d, p = grid.closest(g, search)
    near = ~torch.isnan(p[:, 0])
    q = torch.cat([g, 2 * p[near] - g[near]]) / resolution - 0.5
    w = winding_number(mesh, q, method=winding_method, beta=SIGN_BETA, device=device)
    w_q, jump = w[: len(g)], torch.zeros_like(d)
    jump[near] = w_q[near] - w[len(g) :]
    inside = torch.where(jump.abs() > 0.5, jump > 0, w_q > 0.5)
    s = torch.where(inside, -d, d)
    if thin_shell:
        s = _thin_shell(grid, g.to(torch.int64), s, d, resolution)
    return (s.clamp(-truncation_voxels, truncation_voxels) / resolution).float()


def _thin_shell(
    grid: TriangleGrid, corners: torch.Tensor, s: torch.Tensor, d: torch.Tensor, resolution: int
) -> torch.Tensor:
    """Step 4 of the module docstring on corners [M, 3] int64 with signed / unsigned distances s, d [M] (voxels)."""
    from focusing.data.grid import CORNER_OFFSETS

    extent = resolution + 1

    def lookup(c: torch.Tensor) -> torch.Tensor:
        """Index [K] into the sorted corners of c [K, 3] int64, -1 where absent."""
        k = (c[:, 0] * extent + c[:, 1]) * extent + c[:, 2]
        valid = ((c >= 0) & (c < extent)).all(1)
        at = torch.searchsorted(sorted_key, k).clamp(max=len(sorted_key) - 1)
        return torch.where(valid & (sorted_key[at] == k), order[at], -1)

    key = (corners[:, 0] * extent + corners[:, 1]) * extent + corners[:, 2]
    order = torch.argsort(key)
    sorted_key = key[order]
    negative = s < 0
    r = torch.arange(-1, 2, device=corners.device)
    offsets = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    inside_near = negative.clone()  # the corner or one of its 26 neighbours is inside
    for offset in offsets[(offsets != 0).any(1)]:
        at = lookup(corners + offset)
        inside_near |= (at >= 0) & negative[at.clamp(min=0)]
    # Surface voxels with all 8 corners given, none of them inside or next to an inside corner: thin parts.
    cells = torch.stack(
        [grid.cell_keys // resolution**2, grid.cell_keys // resolution % resolution, grid.cell_keys % resolution], 1
    )
    at = lookup((cells[:, None, :] + CORNER_OFFSETS.to(cells.device, torch.int64)).reshape(-1, 3)).view(-1, 8)
    thin = (at >= 0).all(1)
    at = at[thin]
    at = at[~inside_near[at].any(1)]
    nearest = at.gather(1, d[at].argmin(1, keepdim=True)).squeeze(1)  # its corner nearest to the surface
    s = s.clone()
    s[nearest] = -SHELL_VOXELS
    return s
