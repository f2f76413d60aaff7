"""Rasterisation: for every pixel, the id of the nearest triangle (visibility only; no gradients flow here).

Homogeneous rasterisation (Olano & Greer 1997) in clip space. For a pixel centre p = (px, py) in NDC and a
triangle with clip-space vertices (x_k, y_k, z_k, w_k), let a_k = (x_k - px w_k, y_k - py w_k) and
E_k = a_{k+1} x a_{k+2} (2D cross product, indices mod 3), S = E_0 + E_1 + E_2. Then b_k = E_k / S are the
*perspective-correct* barycentrics of the point where the pixel's ray meets the triangle's plane, for any
signs of w_k; the ray hits the triangle iff all b_k >= 0. Computing a_k per pixel (instead of expanding E_k into
linear edge coefficients) keeps this accurate in float32 even for triangles far smaller than a pixel.

- **Near plane: clipped, exactly, per pixel.** A hit counts only if its clip distance to the near plane,
  sum_k b_k (z_k + w_k), is >= 0 (z_ndc >= -1), i.e. we keep the part of a triangle in front of the near plane,
  as OpenGL's clipper does. The screen bounding box of a triangle crossing the near plane is taken over its
  vertices in front and the points where its edges cross the plane; triangles wholly behind it are dropped.
- **No far clipping**: everything beyond the near plane is rendered (depth is -z_camera, never z_ndc).
- **No backface culling** (meshes may be open and are seen from both sides).
- **Depth test**: per pixel the smallest depth w = sum_k b_k w_k wins; ties go to the lower triangle id. Both
  are packed in one int64 key, float32 bits of the (positive) depth in the high word and the triangle id in the
  low word, so a single `amin` reduction (or `atomic_min`) resolves visibility.

Two implementations share this algebra: the reference below (pure PyTorch, CPU and CUDA: per-triangle
bounding boxes, candidate pixels, edge tests, `scatter_reduce(amin)`, chunked to bound memory) and the Triton
fast path in `focusing.render.raster_triton`, chosen automatically for CUDA tensors.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

BACKGROUND_KEY = torch.iinfo(torch.int64).max
"""Depth-buffer value of empty pixels (also the largest key, so any hit replaces it)."""

BBOX_EPS = 1e-3
"""Bounding boxes are widened by this many pixels so rounding never drops a pixel the edge test accepts."""


def clip_space(vertices: Tensor, mvp: Tensor) -> Tensor:
    """World vertices [V, 3] through `mvp` [B, 4, 4] -> clip coordinates [B, V, 4]."""
    return vertices @ mvp[:, :, :3].transpose(1, 2) + mvp[:, None, :, 3]


def vertex_screen(clip: Tensor) -> tuple[Tensor, Tensor]:
    """Clip-space vertices [V, 4] -> (NDC xy [V, 2], in front of the near plane [V] bool)."""
    w = clip[:, 3]
    front = (clip[:, 2] + w >= 0) & (w > 0)
    return clip[:, :2] / torch.where(front, w, torch.ones_like(w))[:, None], front


def screen_bounds(clip: Tensor, faces: Tensor,
                  screen: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """NDC bounding boxes of triangles `faces` [T, 3] of clip-space vertices `clip` [V, 4], clipped to the near
    plane: over the corners in front of it and the points where edges cross it. `screen`: `vertex_screen(clip)`.

    Returns (lo [T, 2], hi [T, 2]); lo = +inf for triangles with nothing in front of the near plane (or with
    non-finite coordinates).
    """
    xy, front = vertex_screen(clip) if screen is None else screen
    txy, tfront = xy[faces], front[faces]                                   # [T, 3, 2], [T, 3]
    inf = torch.full_like(txy, float("inf"))
    lo = torch.where(tfront[..., None], txy, inf).amin(dim=1)
    hi = torch.where(tfront[..., None], txy, -inf).amax(dim=1)
    partial = torch.nonzero(tfront.any(1) & ~tfront.all(1)).squeeze(1)     # crossing the near plane
    if len(partial):
        tri = clip[faces[partial]]                                          # [P, 3, 4]
        d = tri[..., 2] + tri[..., 3]
        nxt = [1, 2, 0]
        crossing = tfront[partial] != tfront[partial][:, nxt]               # edge k -> k+1 crosses the plane
        t = d / torch.where(crossing, d - d[:, nxt], torch.ones_like(d))
        cut = tri + t[..., None] * (tri[:, nxt] - tri)                      # [P, 3, 4] points on the plane
        crossing &= cut[..., 3] > 0
        cxy = cut[..., :2] / torch.where(crossing, cut[..., 3], torch.ones_like(d))[..., None]
        lo[partial] = torch.minimum(lo[partial], torch.where(crossing[..., None], cxy, inf[:1]).amin(dim=1))
        hi[partial] = torch.maximum(hi[partial], torch.where(crossing[..., None], cxy, -inf[:1]).amax(dim=1))
    bad = ~(torch.isfinite(lo).all(-1) & torch.isfinite(hi).all(-1))
    return torch.where(bad[:, None], torch.full_like(lo, float("inf")), lo), hi


def pixel_ranges(lo: Tensor, hi: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pixel-centre ranges inside NDC boxes: (col0, row0, ncols, nrows), int64 [T]; ncols/nrows 0 if none."""
    u0 = torch.ceil((lo[:, 0] + 1) * (width / 2) - 0.5 - BBOX_EPS)
    u1 = torch.floor((hi[:, 0] + 1) * (width / 2) - 0.5 + BBOX_EPS)
    v0 = torch.ceil((1 - hi[:, 1]) * (height / 2) - 0.5 - BBOX_EPS)
    v1 = torch.floor((1 - lo[:, 1]) * (height / 2) - 0.5 + BBOX_EPS)
    u0, v0 = u0.clamp(0, width), v0.clamp(0, height)   # also maps the +inf of culled triangles to the border
    u1, v1 = u1.clamp(-1, width - 1), v1.clamp(-1, height - 1)
    ncols = (u1 - u0 + 1).clamp_min(0)
    nrows = (v1 - v0 + 1).clamp_min(0)
    return u0.long(), v0.long(), ncols.long(), nrows.long()


def coverage(tri: Tensor, px: Tensor, py: Tensor) -> tuple[Tensor, Tensor]:
    """Ray/triangle test of pixel centres (px, py) [K] (NDC) against triangles `tri` [K, 3, 4] (clip space).

    Returns (hit [K] bool, depth [K] = w of the hit point). See the module docstring for the algebra.
    """
    x, y, z, w = tri.unbind(-1)                        # each [K, 3]
    ax = x - px[:, None] * w
    ay = y - py[:, None] * w
    e0 = ax[:, 1] * ay[:, 2] - ay[:, 1] * ax[:, 2]
    e1 = ax[:, 2] * ay[:, 0] - ay[:, 2] * ax[:, 0]
    e2 = ax[:, 0] * ay[:, 1] - ay[:, 0] * ax[:, 1]
    s = e0 + e1 + e2
    pos = (e0 >= 0) & (e1 >= 0) & (e2 >= 0) & (s > 0)
    neg = (e0 <= 0) & (e1 <= 0) & (e2 <= 0) & (s < 0)
    s_safe = torch.where(pos | neg, s, torch.ones_like(s))
    depth = (e0 * w[:, 0] + e1 * w[:, 1] + e2 * w[:, 2]) / s_safe
    near = (e0 * (z[:, 0] + w[:, 0]) + e1 * (z[:, 1] + w[:, 1]) + e2 * (z[:, 2] + w[:, 2])) / s_safe
    return (pos | neg) & (near >= 0) & (depth > 0), depth


def pack_keys(depth: Tensor, tri_index: Tensor) -> Tensor:
    """int64 depth-test keys: float32 bits of `depth` (> 0) in the high word, `tri_index` in the low word."""
    bits = depth.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32) | tri_index


def unpack_tri_id(keys: Tensor) -> Tensor:
    """Triangle ids from keys (-1 for `BACKGROUND_KEY`)."""
    return torch.where(keys == BACKGROUND_KEY, torch.full_like(keys, -1), keys & 0xFFFFFFFF)


def rasterize(clip: Tensor, faces: Tensor, height: int, width: int, *, backend: str = "auto") -> Tensor:
    """Nearest triangle per pixel: clip-space vertices [B, V, 4], faces [F, 3] -> tri_id [B, H, W] int64 (-1 empty).

    backend: "auto" (Triton on CUDA when available, else the reference), "torch" (reference) or "triton".
    Runs without autograd; the result depends only on the float32 values of `clip`. Face indices must be valid
    (in [0, V)); the Triton path does not check them (`focusing.io` meshes always are).
    """
    if backend == "auto":
        backend = "triton" if clip.is_cuda and _triton_available() else "torch"
    clip = clip.detach().to(torch.float32).contiguous()
    faces = faces.to(device=clip.device, dtype=torch.int64).contiguous()
    if backend == "torch":
        keys = rasterize_keys_reference(clip, faces, height, width)
    elif backend == "triton":
        from focusing.render.raster_triton import rasterize_keys_triton

        keys = rasterize_keys_triton(clip, faces, height, width)
    else:
        raise ValueError(f"unknown rasteriser backend {backend!r} (auto, torch, triton)")
    return unpack_tri_id(keys).view(len(clip), height, width)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


SMALL = 64
"""Triangles whose bounding box holds at most this many pixel centres are rasterised one pixel per step."""


@torch.no_grad()
def rasterize_keys_reference(clip: Tensor, faces: Tensor, height: int, width: int, *,
                             face_chunk: int = 1 << 20, max_candidates: int = 1 << 21) -> Tensor:
    """Reference rasteriser: packed depth|id keys [B * H * W] (row-major, `BACKGROUND_KEY` where empty).

    Faces are processed `face_chunk` at a time. Small triangles (<= `SMALL` candidate pixels, nearly all of a
    fine mesh) are sorted by candidate count and swept one candidate per step, so step k touches a prefix of
    them with no per-pixel gathers; larger ones expand their candidate pixels `max_candidates` at a time.
    """
    n_cam, hw = len(clip), height * width
    keys = torch.full((n_cam * hw,), BACKGROUND_KEY, dtype=torch.int64, device=clip.device)
    for b in range(n_cam):
        screen = vertex_screen(clip[b])
        for f0 in range(0, len(faces), face_chunk):
            chunk = faces[f0:f0 + face_chunk]
            col0, row0, ncols, nrows = pixel_ranges(*screen_bounds(clip[b], chunk, screen), height, width)
            count = ncols * nrows
            active = torch.nonzero(count).squeeze(1)
            count, order = torch.sort(count.index_select(0, active), descending=True)
            order = active.index_select(0, order)
            n_big = int((count > SMALL).sum())
            col0, row0, ncols = (t.index_select(0, order) for t in (col0, row0, ncols))
            tri = clip[b].index_select(0, chunk.index_select(0, order).view(-1)).view(-1, 3, 4)
            ids = order + f0
            _sweep_small(keys, b * hw, tri[n_big:], col0[n_big:], row0[n_big:], ncols[n_big:], count[n_big:],
                         ids[n_big:], height, width)
            _expand_big(keys, b * hw, tri[:n_big], col0[:n_big], row0[:n_big], ncols[:n_big], count[:n_big],
                        ids[:n_big], height, width, max_candidates)
    return keys


def _test_pixels(keys, offset, tri, col, row, ids, height, width) -> None:
    px = (2 * col + 1).to(torch.float32) / width - 1
    py = 1 - (2 * row + 1).to(torch.float32) / height
    hit, depth = coverage(tri, px, py)
    hit = torch.nonzero(hit).squeeze(1)
    pix = (offset + row * width + col).index_select(0, hit)
    keys.scatter_reduce_(0, pix, pack_keys(depth.index_select(0, hit), ids.index_select(0, hit)), reduce="amin")


def _sweep_small(keys, offset, tri, col0, row0, ncols, count, ids, height, width) -> None:
    """Triangles sorted by decreasing `count`; step k tests candidate k of the first n_k (those with count > k)."""
    if len(count) == 0:
        return
    prefix = torch.searchsorted(-count, -torch.arange(1, int(count[0]) + 1, device=count.device), right=True)
    for k, n in enumerate(prefix.tolist()):
        col = col0[:n] + k % ncols[:n]
        row = row0[:n] + torch.div(k, ncols[:n], rounding_mode="floor")
        _test_pixels(keys, offset, tri[:n], col, row, ids[:n], height, width)


def _expand_big(keys, offset, tri, col0, row0, ncols, count, ids, height, width, max_candidates) -> None:
    """Every candidate pixel of every triangle, `max_candidates` at a time (any triangle size)."""
    if len(count) == 0:
        return
    end = torch.cumsum(count, 0)
    total = int(end[-1])
    for c0 in range(0, total, max_candidates):
        cand = torch.arange(c0, min(c0 + max_candidates, total), device=keys.device)
        t = torch.searchsorted(end, cand, right=True)
        local = cand - (end - count).index_select(0, t)
        nc = ncols.index_select(0, t)
        col = col0.index_select(0, t) + local % nc
        row = row0.index_select(0, t) + torch.div(local, nc, rounding_mode="floor")
        _test_pixels(keys, offset, tri.index_select(0, t), col, row, ids.index_select(0, t), height, width)
