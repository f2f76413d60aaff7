"""SparseFlex (paper §3.1, Eq. 1): differentiable dual-marching-cubes extraction on a sparse set of voxels.

Representation. Voxels `coords` [N, 4] (batch, x, y, z) at resolution R; each voxel predicts, for its 8 corners
(corner k at `CORNER_OFFSETS[k]`, x fastest), an SDF value s and a deformation δ, plus FlexiCubes weights
α [8] (per corner), β [12] (per edge, edge order in `focusing.sparseflex.tables`) and γ [1]. Corners shared by
several voxels take the mean of the voxels' predictions; the spread around that mean is the *consistency* term.

Conventions (inputs are the decoder head's raw outputs):
- SDF: `sdf` is a signed distance in the normalised frame ([-0.5, 0.5]^3 units), NEGATIVE INSIDE, like
  `focusing.data.tsdf.corner_tsdf`; it is used as given (no bias, no scaling), so the TSDF warm-up compares it
  with `corner_tsdf` directly. A corner is inside when s < 0 (s == 0 counts as outside). Only signs and ratios
  of s shape the mesh, so a head may emit s in voxel units and divide by R before calling this function.
- Deformation: corner position = grid position + tanh(δ) · 0.5 / R (at most half a voxel, as in FlexiCubes).
- Weights: α, β -> tanh(·) · 0.99 + 1 in (0.01, 1.99); γ -> sigmoid(·) · 0.99 + 0.005. Zeros give uniform
  weights (plain dual marching cubes with mean dual vertices).

Extraction (FlexiCubes, Shen et al. 2023, §4):
- crossing point of a crossed edge (a, b) in a voxel: u = (x_a s_b α_b - x_b s_a α_a) / (s_b α_b - s_a α_a);
- dual vertex: β-weighted mean of the crossing points of its edge group (tables: connected components of the
  crossed edges; C16/C19 ambiguity resolved against the neighbour voxel across the ambiguous face);
- one quad per crossed grid edge whose 4 surrounding voxels are all in the set (at the set's boundary the quad
  is dropped: open surfaces stay open, no walls), oriented so its normal points toward positive SDF;
- training: each quad -> 4 triangles around the γ-weighted centre c = (γ02 m02 + γ13 m13) / (γ02 + γ13), with
  m02, m13 the diagonal midpoints and γ02 = γ0 γ2, γ13 = γ1 γ3 (γ of the dual vertices' voxels);
  inference: 2 triangles along the diagonal with the larger γ product (the diagonal the centre leans to);
- L_dev (FlexiCubes Eq. 8): mean absolute deviation, per dual vertex, of the distances from the dual vertex to
  its plain (α = 1) crossing points.

Corner indexing uses sort/`searchsorted` on linearised keys (`focusing.data.grid`, `focusing.sparse.lookup`);
everything is vectorised and runs unchanged on CPU and CUDA. Unreferenced dual vertices are dropped from the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from focusing.data.grid import corner_positions, voxel_corners
from focusing.sparse.gather import select_rows
from focusing.sparse.lookup import find_voxels
from focusing.sparseflex.tables import tables_on

WEIGHT_SCALE = 0.99
DEFORM_LIMIT = 0.5  # voxels


@dataclass
class SparseFlexResult:
    """Extracted meshes of a batch (all concatenated) and the regularisers.

    vertices [V, 3] (normalised frame), faces [F, 3] int64, vertex_batch [V] / face_batch [F] int64: batch of
    each; dev_loss: FlexiCubes L_dev (scalar); consistency: mean squared spread of the per-voxel corner
    predictions around the shared-corner mean (SDF in voxel units, i.e. times R, plus raw δ);
    corners [M, 4] int32 (sorted), corner_sdf [M], corner_offset [M, 3] (deformation, normalised units),
    voxel_to_corner [N, 8] int64: the shared-corner field, for the TV and TSDF losses.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    vertex_batch: torch.Tensor
    face_batch: torch.Tensor
    batch_size: int
    dev_loss: torch.Tensor
    consistency: torch.Tensor
    corners: torch.Tensor
    corner_sdf: torch.Tensor
    corner_offset: torch.Tensor
    voxel_to_corner: torch.Tensor

    def mesh(self, b: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(vertices [Vb, 3], faces [Fb, 3]) of batch item `b` (differentiable w.r.t. the vertices)."""
        keep = self.vertex_batch == b
        remap = torch.cumsum(keep, 0) - 1
        return select_rows(self.vertices, keep), remap[self.faces[self.face_batch == b]]

    def meshes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.mesh(b) for b in range(self.batch_size)]


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[index]` for an integer index of any shape -> `[*index.shape, *x.shape[1:]]`, as `index_select`: its
    backward accumulates with index_add (atomic adds on CUDA), where advanced indexing's sorts the indices first."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def weights_from_raw(alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor):
    """Raw α [N, 8], β [N, 12], γ [N] -> positive FlexiCubes weights (see the module docstring)."""
    return (
        torch.tanh(alpha) * WEIGHT_SCALE + 1,
        torch.tanh(beta) * WEIGHT_SCALE + 1,
        torch.sigmoid(gamma) * WEIGHT_SCALE + (1 - WEIGHT_SCALE) / 2,
    )


def average_corners(values: torch.Tensor, voxel_to_corner: torch.Tensor, n_corners: int) -> torch.Tensor:
    """Mean over the voxels sharing each corner: values [N, 8, ...] -> [M, ...]."""
    flat_idx = voxel_to_corner.reshape(-1)
    flat = values.reshape(flat_idx.numel(), math.prod(values.shape[2:]))
    total = torch.zeros((n_corners, flat.shape[1]), dtype=flat.dtype, device=flat.device).index_add_(0, flat_idx, flat)
    count = torch.bincount(flat_idx, minlength=n_corners).clamp_(min=1).to(flat.dtype)
    return (total / count[:, None]).reshape((n_corners,) + values.shape[2:])


def case_ids(coords: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """[N] marching-cubes case of each voxel from `inside` [N, 8] bool, C16/C19 ambiguity resolved.

    A flagged case whose neighbour across its ambiguous face is in the set and flagged too becomes 255 - case.
    """
    t = tables_on(inside.device)
    bits = (1 << torch.arange(8, device=inside.device)).to(torch.int64)
    case = (inside.to(torch.int64) * bits).sum(1)
    flagged = torch.nonzero(t["ambiguous_flag"][case]).squeeze(1)
    query = coords[flagged].to(torch.int64)
    query[:, 1:] += t["ambiguous_dir"][case[flagged]]
    inside_grid = (query[:, 1:] >= 0).all(1)
    nbr = find_voxels(query.clamp(min=0), coords)
    both = inside_grid & (nbr >= 0) & t["ambiguous_flag"][case[nbr.clamp(min=0)]]
    case[flagged[both]] = 255 - case[flagged[both]]
    return case


def sparseflex_mesh(
    coords: torch.Tensor,
    resolution: int,
    sdf: torch.Tensor,
    deform: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    training: bool,
) -> SparseFlexResult:
    """Extract the SparseFlex meshes of a batch of sparse voxel sets (see the module docstring).

    coords [N, 4] int (batch, x, y, z), unique; sdf [N, 8]; deform [N, 8, 3]; alpha [N, 8]; beta [N, 12];
    gamma [N] or [N, 1]. `training` selects the 4-triangle split (differentiable in γ) over the 2-triangle one.
    """
    device, dtype = sdf.device, sdf.dtype
    t = tables_on(device)
    n = len(coords)
    batch_size = int(coords[:, 0].max().item()) + 1 if n else 0
    corners, v2c = voxel_corners(coords)
    m = len(corners)

    corner_field = average_corners(torch.cat([sdf[..., None], deform], -1), v2c, m)  # [M, 4]: one pass for s, δ
    corner_sdf, corner_deform = corner_field[:, 0], corner_field[:, 1:]
    consistency = ((sdf - take(corner_sdf, v2c)) * resolution).square().mean() if n else sdf.sum()
    if n:
        consistency = consistency + (deform - take(corner_deform, v2c)).square().mean()
    corner_offset = torch.tanh(corner_deform) * (DEFORM_LIMIT / resolution)
    corner_pos = corner_positions(corners, resolution, dtype) + corner_offset
    alpha_w, beta_w, gamma_w = weights_from_raw(alpha, beta, gamma.reshape(-1))

    with torch.no_grad():
        case = case_ids(coords, corner_sdf[v2c] < 0)
        surf = torch.nonzero((case > 0) & (case < 255)).squeeze(1)  # [S]
        surf_case = case[surf]
        edge_dual = t["edge_to_dual"][surf_case]  # [S, 12]
        vi, ei = torch.nonzero(edge_dual >= 0, as_tuple=True)  # crossed (voxel, edge) pairs, K of them
        num_dual = t["num_dual"][surf_case]
        first_dual = torch.cumsum(num_dual, 0) - num_dual
        dual = first_dual[vi] + edge_dual[vi, ei]  # [K] global dual-vertex id
        n_dual = int(num_dual.sum().item())
        dual_voxel = torch.repeat_interleave(surf, num_dual, output_size=n_dual)  # [D]
        vox = surf[vi]
        ca = v2c[vox, t["edge_corners"][ei, 0]]  # lower corner of the edge (global)
        cb = v2c[vox, t["edge_corners"][ei, 1]]
        axis = ei // 4

    # crossing points (α-weighted for the dual vertices, plain for L_dev) and β-weighted dual vertices
    sa, sb = take(corner_sdf, ca)[:, None], take(corner_sdf, cb)[:, None]
    xa, xb = take(corner_pos, ca), take(corner_pos, cb)
    wa = sa * take(alpha_w.reshape(-1), vox * 8 + t["edge_corners"][ei, 0])[:, None]
    wb = sb * take(alpha_w.reshape(-1), vox * 8 + t["edge_corners"][ei, 1])[:, None]
    crossing = (xa * wb - xb * wa) / (wb - wa)
    plain = (xa * sb - xb * sa) / (sb - sa)
    b = take(beta_w.reshape(-1), vox * 12 + ei)[:, None]
    vd = torch.zeros((n_dual, 3), dtype=dtype, device=device).index_add(0, dual, crossing * b)
    vd = vd / torch.zeros((n_dual, 1), dtype=dtype, device=device).index_add(0, dual, b)
    dev_loss = _deviation(vd, plain, dual, n_dual)

    quads, flip = _quads(ca, ei, axis, dual, corner_sdf, t["quad_cycle"])
    quads = torch.where(flip[:, None], quads.flip(1), quads)
    g = take(gamma_w, dual_voxel)
    gq = take(g, quads)  # [Q, 4]
    g02, g13 = gq[:, 0] * gq[:, 2], gq[:, 1] * gq[:, 3]
    if training:
        q = take(vd, quads)  # [Q, 4, 3]
        w02, w13 = g02[:, None], g13[:, None]
        centre = (w02 * (q[:, 0] + q[:, 2]) + w13 * (q[:, 1] + q[:, 3])) / (2 * (w02 + w13))
        centre_id = torch.arange(len(quads), device=device) + n_dual
        ring = torch.stack([quads, quads.roll(-1, dims=1)], dim=2)  # [Q, 4, 2] consecutive pairs
        faces = torch.cat([ring, centre_id[:, None, None].expand(-1, 4, 1)], dim=2).reshape(-1, 3)
        vertices = torch.cat([vd, centre])
        vertex_voxel = torch.cat([dual_voxel, dual_voxel[quads[:, 0]]])
    else:
        along02 = (g02 > g13)[:, None]
        tri_a = torch.where(along02, quads[:, [0, 1, 2]], quads[:, [0, 1, 3]])
        tri_b = torch.where(along02, quads[:, [0, 2, 3]], quads[:, [1, 2, 3]])
        faces = torch.stack([tri_a, tri_b], dim=1).reshape(-1, 3)
        vertices, vertex_voxel = vd, dual_voxel

    vertices, faces, vertex_voxel = _drop_unreferenced(vertices, faces, vertex_voxel)
    vertex_batch = coords[vertex_voxel, 0].to(torch.int64)
    face_batch = vertex_batch[faces[:, 0]] if len(faces) else torch.zeros(0, dtype=torch.int64, device=device)
    return SparseFlexResult(
        vertices=vertices,
        faces=faces,
        vertex_batch=vertex_batch,
        face_batch=face_batch,
        batch_size=batch_size,
        dev_loss=dev_loss,
        consistency=consistency,
        corners=corners,
        corner_sdf=corner_sdf,
        corner_offset=corner_offset,
        voxel_to_corner=v2c,
    )


def _deviation(vd: torch.Tensor, plain: torch.Tensor, dual: torch.Tensor, n_dual: int) -> torch.Tensor:
    """FlexiCubes L_dev: mean over (dual vertex, crossed edge) of | d - mean_d |, d = |plain crossing - vd|."""
    if len(dual) == 0:
        return vd.sum() * 0
    dist = torch.linalg.vector_norm(plain - take(vd, dual), dim=1)
    count = torch.bincount(dual, minlength=n_dual).clamp_(min=1).to(dist.dtype)
    mean = torch.zeros(n_dual, dtype=dist.dtype, device=dist.device).index_add(0, dual, dist) / count
    return (dist - take(mean, dual)).abs().mean()


@torch.no_grad()
def _quads(
    lower: torch.Tensor, edge: torch.Tensor, axis: torch.Tensor, dual: torch.Tensor, corner_sdf: torch.Tensor,
    cycle: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quads [Q, 4] of dual-vertex ids around grid edges held by 4 voxels, and whether to flip each.

    lower [K]: global id of each crossed (voxel, edge) pair's lower corner; edge [K]: local edge index; a grid edge
    is identified by (lower corner, axis). Sorting the pairs by (grid edge, slot j = edge % 4) lines up the 4
    voxels of a complete edge in slot order; `cycle` turns that into a loop around +axis. A quad is flipped when
    its lower corner is outside, so that every normal points toward positive SDF.
    """
    key = lower * 3 + axis
    order = torch.argsort(key * 4 + edge % 4)
    key_sorted = key[order]
    k = len(key_sorted)
    start = torch.ones(k, dtype=torch.bool, device=key.device)
    start[1:] = key_sorted[1:] != key_sorted[:-1]
    first = torch.nonzero(start).squeeze(1)
    first = first[first + 3 < k]
    first = first[key_sorted[first + 3] == key_sorted[first]]  # groups of exactly 4 (at most 4 exist)
    quad_axis = axis[order[first]]
    slots = first[:, None] + cycle[quad_axis]
    quads = dual[order[slots]]
    flip = corner_sdf[lower[order[first]]] >= 0
    return quads, flip


def _drop_unreferenced(vertices: torch.Tensor, faces: torch.Tensor, vertex_voxel: torch.Tensor):
    """Keep only vertices used by a face (dual vertices of boundary voxels may have no quad)."""
    used = torch.zeros(len(vertices), dtype=torch.bool, device=vertices.device)
    used[faces.reshape(-1)] = True
    remap = torch.cumsum(used, 0) - 1
    return select_rows(vertices, used), remap[faces], vertex_voxel[used]
