"""Analytic silhouette antialiasing with gradients to vertex positions (after nvdiffrast's `antialias`).

Rasterised coverage is a step function of the vertex positions, so a mask loss alone has no gradient. For every
pair of horizontally or vertically adjacent pixels whose triangle ids differ, take the *front* triangle (the
one not on the background, or with the smaller depth) and follow the segment from its pixel centre towards the
other pixel centre across the surface: leave the triangle through the edge the segment crosses; if that edge is
a **silhouette edge** (a boundary edge, or one whose neighbouring face folds back onto the same side in screen
space) stop there, otherwise step into the neighbouring face and repeat (at most `max_steps` faces, so fine
meshes whose triangles are smaller than a pixel still find their silhouette; nvdiffrast looks at the first
triangle only; the walk also ends, without a silhouette, on entering the other pixel's triangle or passing its
centre). If a silhouette edge, more perpendicular than parallel to the segment, crosses it at a fraction
`c` in [0, 1] of the way from the front pixel to the other pixel, then, with the pixel border at 0.5:

- c < 0.5: the surface stops short of the border, so the front pixel moves towards the other pixel's value by
  (0.5 - c);
- c > 0.5: the surface covers part of the other pixel, which moves towards the front value by (c - 0.5).

The search is discrete (no gradient); `c` is then recomputed from the two projected edge vertices *with
autograd*, so the blended image (mask, depth, normal) has gradients w.r.t. the vertices that move the
silhouette, and stays continuous when an edge passes a pixel centre. The antialiased mask summed over the image
approximates the projected area. Pairs whose walk meets a vertex behind the camera are left unblended.

The walk needs the mesh topology: per face and edge k (the edge opposite corner k), the neighbouring face and
its corner opposite the edge (`MeshTopology`, one sort of the edge keys).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from focusing.device import fused

Tensor = torch.Tensor

EDGE_EPS = 1.0 / 16.0
"""Crossings up to this far (in pixels) outside the segment still count (rounding of the rasteriser)."""

MAX_STEPS = 32
"""Faces walked per pixel pair when looking for the silhouette edge."""


@dataclass
class MeshTopology:
    """Edge adjacency of a triangle mesh: `table` [F, 6] int64. For edge k of face f (the edge opposite corner k),
    table[f, k] is the neighbouring face across it and table[f, 3 + k] that face's corner not on the edge (-1 on
    a boundary). Non-manifold edges pick one of their other faces."""

    table: Tensor

    @property
    def adjacent(self) -> Tensor:
        return self.table[:, :3]

    @property
    def opposite(self) -> Tensor:
        return self.table[:, 3:]


def mesh_topology(faces: Tensor, num_vertices: int | None = None) -> MeshTopology:
    """Build the `MeshTopology` of faces [F, 3] by sorting the 3F edge keys."""
    faces = faces.to(torch.int64)
    n_faces = len(faces)
    if n_faces == 0:
        return MeshTopology(faces.new_empty(0, 6))
    if num_vertices is None:
        num_vertices = int(faces.max()) + 1
    a, b = faces.roll(-1, 1).reshape(-1), faces.roll(1, 1).reshape(-1)   # half-edge h = 3 f + k: corners k+1, k+2
    key, order = torch.sort(torch.minimum(a, b) * num_vertices + torch.maximum(a, b))
    same_next = torch.zeros_like(key, dtype=torch.bool)
    same_next[:-1] = key[1:] == key[:-1]
    same_prev = torch.zeros_like(same_next)
    same_prev[1:] = same_next[:-1]
    pos = torch.arange(len(key), device=key.device)
    partner = order.index_select(0, torch.where(same_next, pos + 1, pos - 1).clamp(0, len(key) - 1))
    has = same_next | same_prev
    none = torch.full_like(partner, -1)
    table = torch.empty(3 * n_faces, 2, dtype=torch.int64, device=faces.device)
    table[order, 0] = torch.where(has, torch.div(partner, 3, rounding_mode="floor"), none)
    table[order, 1] = torch.where(has, faces.reshape(-1).index_select(0, partner), none)
    return MeshTopology(table.view(n_faces, 3, 2).transpose(1, 2).reshape(n_faces, 6).contiguous())


class _TopologyCache:
    """Topologies of the last few face tensors, keyed by tensor identity and version (GT meshes are rendered
    from many views; their multi-million-face tables should be built once)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: dict[int, tuple] = {}

    def get(self, faces: Tensor, num_vertices: int) -> MeshTopology:
        key = id(faces)
        entry = self.entries.get(key)
        if entry is not None:
            ref, version, nv, topo = entry
            if ref() is faces and version == faces._version and nv == num_vertices:
                return topo
        topo = mesh_topology(faces, num_vertices)
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (weakref.ref(faces, lambda _, k=key: self.entries.pop(k, None)), faces._version,
                             num_vertices, topo)
        return topo


_CACHE = _TopologyCache()


def cached_mesh_topology(faces: Tensor, num_vertices: int) -> MeshTopology:
    """`mesh_topology`, memoised on the `faces` tensor object (rebuilt if it is modified in place)."""
    return _CACHE.get(faces, num_vertices)


@dataclass
class SilhouetteCrossings:
    """Pixel pairs that straddle a silhouette edge, [K] each: p0 / p1 flat pixel indices into [B, H, W] (p1 is
    p0's right or lower neighbour), `front` the one of them whose triangle is in front, `edge_a` / `edge_b` the
    silhouette edge's vertex ids."""

    p0: Tensor
    p1: Tensor
    front: Tensor
    edge_a: Tensor
    edge_b: Tensor


def pixel_pairs(tri_id: Tensor) -> tuple[Tensor, Tensor]:
    """Adjacent pixel pairs with different triangle ids: (p0 [K], p1 [K]) flat indices into [B, H, W], p1 the right
    (horizontal pairs first) or lower (vertical pairs) neighbour of p0."""
    n_cam, height, width = tri_id.shape
    idx = torch.arange(n_cam * height * width, device=tri_id.device).view(n_cam, height, width)
    h = tri_id[:, :, :-1] != tri_id[:, :, 1:]
    v = tri_id[:, :-1, :] != tri_id[:, 1:, :]
    return torch.cat([idx[:, :, :-1][h], idx[:, :-1, :][v]]), torch.cat([idx[:, :, 1:][h], idx[:, 1:, :][v]])


def pair_frames(origin: Tensor, other: Tensor, height: int, width: int, dtype) -> tuple[Tensor, Tensor]:
    """Per pair of flat pixel indices: (camera index [K], coefficients [K, 6]) of the affine map from NDC (x, y)
    to the pair frame: pixel units, origin at the `origin` pixel centre, X = (c0, c1, c2) . (x, y, 1) along the
    pair (the `other` pixel centre at X = +1) and Y = (c3, c4, c5) . (x, y, 1) across it."""
    hw = height * width
    cam, r = torch.div(origin, hw, rounding_mode="floor"), origin % hw
    row, col = torch.div(r, width, rounding_mode="floor"), r % width
    vertical = row != torch.div(other % hw, width, rounding_mode="floor")
    sign = torch.where(other > origin, 1.0, -1.0).to(dtype)
    hu, hv = width / 2, height / 2
    u0, v0 = col.to(dtype) + 0.5, row.to(dtype) + 0.5
    zero = torch.zeros_like(sign)
    ax = torch.where(vertical, zero, sign * hu)
    ay = torch.where(vertical, -sign * hv, zero)
    a0 = sign * torch.where(vertical, hv - v0, hu - u0)
    bx = torch.where(vertical, zero + hu, zero)
    by = torch.where(vertical, zero, zero - hv)
    b0 = torch.where(vertical, hu - u0, hv - v0)
    return cam, torch.stack([ax, ay, a0, bx, by, b0], dim=1)


def to_pair_frame(clip: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Clip positions [K, m, 4] -> (X, Y, ok) [K, m] in the pair frames `coef` [K, 6]; ok where w > 0."""
    w = clip[..., 3]
    ok = w > 0
    w = torch.where(ok, w, torch.ones_like(w))
    sx, sy = clip[..., 0] / w, clip[..., 1] / w
    c = coef[:, None, :]
    return c[..., 0] * sx + c[..., 1] * sy + c[..., 2], c[..., 3] * sx + c[..., 4] * sy + c[..., 5], ok


def _orient(ax, ay, bx, by, cx, cy):
    """Twice the signed area of 2D triangles (a, b, c)."""
    return (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)


@torch.no_grad()
def find_silhouette_crossings(tri_id: Tensor, depth: Tensor, clip: Tensor, faces: Tensor, topology: MeshTopology,
                              max_steps: int = MAX_STEPS) -> SilhouetteCrossings:
    """Reference (PyTorch) silhouette search for every pixel pair with different triangle ids (module docstring).

    tri_id [B, H, W]; depth [B, H, W] (only compared); clip [B, V, 4] clip-space vertices; faces [F, 3].
    All pairs walk in lock-step; each step keeps the pairs still searching.
    """
    height, width = tri_id.shape[1:]
    flat, d = tri_id.reshape(-1), depth.reshape(-1)
    p0, p1 = pixel_pairs(tri_id)
    t0, t1 = flat.index_select(0, p0), flat.index_select(0, p1)
    use1 = (t0 < 0) | ((t1 >= 0) & (d.index_select(0, p1) < d.index_select(0, p0)))
    origin = torch.where(use1, p1, p0)
    cam, coef = pair_frames(origin, torch.where(use1, p0, p1), height, width, clip.dtype)
    points = clip.reshape(-1, 4)
    # walk state, one row per pair still searching
    rows = torch.arange(len(p0), device=p0.device)
    base = cam * clip.shape[1]
    face = torch.where(use1, t1, t0)
    target = torch.where(use1, t0, t1)                                   # reaching it means no silhouette
    entry = torch.full_like(face, -1)                                    # corner of `face` we came through
    found_rows, found_a, found_b = [rows[:0]], [face[:0]], [face[:0]]
    for _ in range(max_steps):
        if len(rows) == 0:
            break
        corners = faces.index_select(0, face)                                            # [K, 3]
        x, y, ok = to_pair_frame(points.index_select(0, (base[:, None] + corners).view(-1)).view(-1, 3, 4), coef)
        xa, ya, xb, yb = x.roll(-1, 1), y.roll(-1, 1), x.roll(1, 1), y.roll(1, 1)     # edge k: corner k+1 -> k+2
        crosses = (torch.signbit(ya) != torch.signbit(yb)) & (ya != yb) & (corners != entry[:, None])
        cross_x = xa - ya * (xb - xa) / torch.where(crosses, yb - ya, torch.ones_like(ya))
        c, k = torch.where(crosses, cross_x, torch.full_like(cross_x, -float("inf"))).max(dim=1)
        k = k[:, None]

        def pick(t: Tensor, k: Tensor = k) -> Tensor:
            return t.gather(1, k).squeeze(1)

        alive = crosses.any(1) & ok.all(1) & (c <= 1 + EDGE_EPS)
        links = topology.table.index_select(0, face)
        nbr, opp = pick(links), links.gather(1, k + 3).squeeze(1)
        ox, oy, o_ok = to_pair_frame(points.index_select(0, base + opp.clamp_min(0))[:, None], coef)
        ax, ay, bx, by = pick(xa), pick(ya), pick(xb), pick(yb)
        inner = _orient(pick(x), pick(y), ax, ay, bx, by)               # the face's own corner opposite the edge
        wing = _orient(ox[:, 0], oy[:, 0], ax, ay, bx, by)             # the neighbour's corner opposite the edge
        boundary = nbr < 0
        silhouette = boundary | (torch.signbit(inner) == torch.signbit(wing))
        usable = (by - ay).abs() >= (bx - ax).abs()                      # more across the pair than along it
        done = torch.nonzero(alive & silhouette & (boundary | o_ok[:, 0]) & usable & (c >= -EDGE_EPS)).squeeze(1)
        found_rows.append(rows.index_select(0, done))
        found_a.append(corners.gather(1, (k + 1) % 3).squeeze(1).index_select(0, done))
        found_b.append(corners.gather(1, (k + 2) % 3).squeeze(1).index_select(0, done))
        walk = torch.nonzero(alive & ~silhouette & o_ok[:, 0] & (nbr != target)).squeeze(1)
        rows, base, coef, target = (t.index_select(0, walk) for t in (rows, base, coef, target))
        face, entry = nbr.index_select(0, walk), opp.index_select(0, walk)
    hits = torch.cat(found_rows)
    return SilhouetteCrossings(p0.index_select(0, hits), p1.index_select(0, hits), origin.index_select(0, hits),
                               torch.cat(found_a), torch.cat(found_b))


def crossing_alpha(ends: Tensor, mvp: Tensor, front: Tensor, other: Tensor, height: int, width: int) -> Tensor:
    """Blend weights [K] of silhouette crossings between pixels `front` and `other` [K] (flat indices into
    [B, H, W]): edge ends [K, 2, 3] (world), mvp [B, 4, 4]. > 0: the lower-index pixel changes, < 0: the other.
    Pure tensor math (one fusable graph for torch.compile)."""
    cam, coef = pair_frames(front, other, height, width, ends.dtype)
    m = mvp[cam]
    x, y, _ = to_pair_frame(ends @ m[:, :, :3].transpose(1, 2) + m[:, None, :, 3], coef)
    c = (x[:, 0] - y[:, 0] * (x[:, 1] - x[:, 0]) / (y[:, 1] - y[:, 0])).clamp(0.0, 1.0)
    return torch.where(front < other, 0.5 - c, c - 0.5)


def blend_silhouettes(image: Tensor, crossings: SilhouetteCrossings, vertices: Tensor, mvp: Tensor) -> Tensor:
    """Blend `image` [B, H, W, C] across the silhouette `crossings` (module docstring); differentiable w.r.t.
    `image` and `vertices` [V, 3]. mvp [B, 4, 4]: the cameras' world -> clip matrices."""
    n_cam, height, width, channels = image.shape
    if len(crossings.p0) == 0:
        return image
    front, p0, p1 = crossings.front, crossings.p0, crossings.p1
    ends = vertices.index_select(0, torch.stack([crossings.edge_a, crossings.edge_b], 1).view(-1)).view(-1, 2, 3)
    alpha = fused(crossing_alpha)(ends, mvp, front, p0 + p1 - front, height, width)
    flat = image.reshape(-1, channels)
    delta = alpha[:, None] * (flat.index_select(0, p1) - flat.index_select(0, p0))
    return flat.index_add(0, torch.where(alpha > 0, p0, p1), delta).view(n_cam, height, width, channels)


def antialias(image: Tensor, tri_id: Tensor, vertices: Tensor, faces: Tensor, mvp: Tensor, *,
              topology: MeshTopology | None = None, clip: Tensor | None = None,
              max_steps: int = MAX_STEPS, backend: str = "auto") -> Tensor:
    """Antialias `image` [B, H, W, C] (channel 0 must be depth) rendered with `tri_id` [B, H, W].

    vertices [V, 3] (may require grad), faces [F, 3], mvp [B, 4, 4]; topology defaults to the cached
    `mesh_topology(faces)`, clip to the clip-space vertices [B, V, 4]. backend of the silhouette search:
    "auto" (Triton on CUDA when available), "torch" (reference) or "triton".
    """
    if topology is None:
        topology = cached_mesh_topology(faces, len(vertices))
    if clip is None:
        from focusing.render.raster import clip_space

        clip = clip_space(vertices.detach(), mvp)
    if backend == "auto":
        from focusing.render.raster import _triton_available

        backend = "triton" if tri_id.is_cuda and _triton_available() else "torch"
    if backend == "torch":
        crossings = find_silhouette_crossings(tri_id, image[..., 0].detach(), clip, faces, topology, max_steps)
    elif backend == "triton":
        from focusing.render.antialias_triton import find_silhouette_crossings_triton

        crossings = find_silhouette_crossings_triton(tri_id, image[..., 0].detach(), clip, faces, topology.table,
                                                     max_steps)
    else:
        raise ValueError(f"unknown antialias backend {backend!r} (auto, torch, triton)")
    return blend_silhouettes(image, crossings, vertices, mvp)
