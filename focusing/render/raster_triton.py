"""Triton fast path of the visibility pass (same algebra as the reference in `focusing.render.raster`).

Two kernels, no host synchronisation:

1. `_raster_small_kernel`, one lane per (camera, triangle): fetches the triangle's clip-space vertices, computes
   its near-clipped screen bounding box and, if the box holds at most `SMALL` pixel centres (nearly every
   triangle of a fine mesh), tests those pixels itself and `atomic_min`s the packed depth|id keys into the
   depth buffer. Larger triangles are appended to a work list (an atomic counter hands out slots).
2. `_raster_big_kernel`, persistent programs that take the listed triangles one at a time and sweep their
   bounding box `TILE` pixels per step, one pixel per lane.

Triangles are visited in any order; `atomic_min` on int64 keys makes the result order-independent (up to
floating-point contraction, which may differ from the PyTorch reference by an ulp at exact ties and edges).
Runs on CUDA, and on CPU tensors under `TRITON_INTERPRET=1` (the tests exercise it that way). The sizes that
change every step (`n_faces`, `n_verts`) are not specialised on (`do_not_specialize`): Triton would otherwise
compile a kernel again for each new pattern of divisibility by 16 (0.6 s spikes in `render_pred` on an H100).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from focusing.render.raster import BACKGROUND_KEY, BBOX_EPS

SMALL = 32      # bounding boxes with at most this many pixel centres are rasterised by kernel 1
BLOCK = 128     # triangles per program in kernel 1
TILE = 256      # pixels per step in kernel 2


@triton.jit
def _floor(x):
    t = x.to(tl.int32)
    return t - (t.to(tl.float32) > x).to(tl.int32)


@triton.jit
def _ceil(x):
    t = x.to(tl.int32)
    return t + (t.to(tl.float32) < x).to(tl.int32)


@triton.jit
def _near_cut(xa, ya, wa, da, fa, xb, yb, wb, db, fb):
    """Screen point where edge a->b crosses the near plane, and whether it does."""
    cross = fa != fb
    t = da / tl.where(cross, da - db, 1.0)
    x = xa + t * (xb - xa)
    y = ya + t * (yb - ya)
    w = wa + t * (wb - wa)
    cross = cross & (w > 0)
    w = tl.where(cross, w, 1.0)
    return x / w, y / w, cross


@triton.jit
def _triangle_setup(clip_ptr, faces_ptr, b, f, valid, n_verts, height, width, hf, wf, eps):
    """Clip-space vertices and pixel range (col0, row0, ncols, nrows) of triangle f seen by camera b."""
    i0 = tl.load(faces_ptr + f * 3 + 0, mask=valid, other=0).to(tl.int64)
    i1 = tl.load(faces_ptr + f * 3 + 1, mask=valid, other=0).to(tl.int64)
    i2 = tl.load(faces_ptr + f * 3 + 2, mask=valid, other=0).to(tl.int64)
    base = clip_ptr + b.to(tl.int64) * n_verts * 4
    x0 = tl.load(base + i0 * 4 + 0, mask=valid, other=0.0)
    y0 = tl.load(base + i0 * 4 + 1, mask=valid, other=0.0)
    z0 = tl.load(base + i0 * 4 + 2, mask=valid, other=0.0)
    w0 = tl.load(base + i0 * 4 + 3, mask=valid, other=0.0)
    x1 = tl.load(base + i1 * 4 + 0, mask=valid, other=0.0)
    y1 = tl.load(base + i1 * 4 + 1, mask=valid, other=0.0)
    z1 = tl.load(base + i1 * 4 + 2, mask=valid, other=0.0)
    w1 = tl.load(base + i1 * 4 + 3, mask=valid, other=0.0)
    x2 = tl.load(base + i2 * 4 + 0, mask=valid, other=0.0)
    y2 = tl.load(base + i2 * 4 + 1, mask=valid, other=0.0)
    z2 = tl.load(base + i2 * 4 + 2, mask=valid, other=0.0)
    w2 = tl.load(base + i2 * 4 + 3, mask=valid, other=0.0)
    d0 = z0 + w0
    d1 = z1 + w1
    d2 = z2 + w2
    f0 = (d0 >= 0) & (w0 > 0)
    f1 = (d1 >= 0) & (w1 > 0)
    f2 = (d2 >= 0) & (w2 > 0)
    inf = float("inf")
    sx0 = x0 / tl.where(f0, w0, 1.0)
    sy0 = y0 / tl.where(f0, w0, 1.0)
    sx1 = x1 / tl.where(f1, w1, 1.0)
    sy1 = y1 / tl.where(f1, w1, 1.0)
    sx2 = x2 / tl.where(f2, w2, 1.0)
    sy2 = y2 / tl.where(f2, w2, 1.0)
    xmin = tl.minimum(tl.minimum(tl.where(f0, sx0, inf), tl.where(f1, sx1, inf)), tl.where(f2, sx2, inf))
    xmax = tl.maximum(tl.maximum(tl.where(f0, sx0, -inf), tl.where(f1, sx1, -inf)), tl.where(f2, sx2, -inf))
    ymin = tl.minimum(tl.minimum(tl.where(f0, sy0, inf), tl.where(f1, sy1, inf)), tl.where(f2, sy2, inf))
    ymax = tl.maximum(tl.maximum(tl.where(f0, sy0, -inf), tl.where(f1, sy1, -inf)), tl.where(f2, sy2, -inf))
    cx, cy, c = _near_cut(x0, y0, w0, d0, f0, x1, y1, w1, d1, f1)
    xmin = tl.minimum(xmin, tl.where(c, cx, inf))
    xmax = tl.maximum(xmax, tl.where(c, cx, -inf))
    ymin = tl.minimum(ymin, tl.where(c, cy, inf))
    ymax = tl.maximum(ymax, tl.where(c, cy, -inf))
    cx, cy, c = _near_cut(x1, y1, w1, d1, f1, x2, y2, w2, d2, f2)
    xmin = tl.minimum(xmin, tl.where(c, cx, inf))
    xmax = tl.maximum(xmax, tl.where(c, cx, -inf))
    ymin = tl.minimum(ymin, tl.where(c, cy, inf))
    ymax = tl.maximum(ymax, tl.where(c, cy, -inf))
    cx, cy, c = _near_cut(x2, y2, w2, d2, f2, x0, y0, w0, d0, f0)
    xmin = tl.minimum(xmin, tl.where(c, cx, inf))
    xmax = tl.maximum(xmax, tl.where(c, cx, -inf))
    ymin = tl.minimum(ymin, tl.where(c, cy, inf))
    ymax = tl.maximum(ymax, tl.where(c, cy, -inf))
    # empty, NaN or infinite boxes are culled (all comparisons with NaN are false)
    box = valid & (xmin <= xmax) & (ymin <= ymax) & (xmin > -1e30) & (xmax < 1e30) & (ymin > -1e30) & (ymax < 1e30)
    u0 = tl.minimum(tl.maximum((xmin + 1.0) * (wf * 0.5) - 0.5 - eps, -2.0), wf + 1.0)
    u1 = tl.minimum(tl.maximum((xmax + 1.0) * (wf * 0.5) - 0.5 + eps, -2.0), wf + 1.0)
    v0 = tl.minimum(tl.maximum((1.0 - ymax) * (hf * 0.5) - 0.5 - eps, -2.0), hf + 1.0)
    v1 = tl.minimum(tl.maximum((1.0 - ymin) * (hf * 0.5) - 0.5 + eps, -2.0), hf + 1.0)
    col0 = tl.maximum(_ceil(u0), 0)
    col1 = tl.minimum(_floor(u1), width - 1)
    row0 = tl.maximum(_ceil(v0), 0)
    row1 = tl.minimum(_floor(v1), height - 1)
    ncols = tl.where(box, tl.maximum(col1 - col0 + 1, 0), 0)
    nrows = tl.where(box, tl.maximum(row1 - row0 + 1, 0), 0)
    return x0, y0, z0, w0, x1, y1, z1, w1, x2, y2, z2, w2, col0, row0, ncols, nrows


@triton.jit
def _cover_key(x0, y0, z0, w0, x1, y1, z1, w1, x2, y2, z2, w2, px, py, f):
    """Homogeneous ray/triangle test at NDC pixel centres (px, py); returns (hit, packed depth|id key)."""
    ax0 = x0 - px * w0
    ay0 = y0 - py * w0
    ax1 = x1 - px * w1
    ay1 = y1 - py * w1
    ax2 = x2 - px * w2
    ay2 = y2 - py * w2
    e0 = ax1 * ay2 - ay1 * ax2
    e1 = ax2 * ay0 - ay2 * ax0
    e2 = ax0 * ay1 - ay0 * ax1
    s = e0 + e1 + e2
    pos = (e0 >= 0) & (e1 >= 0) & (e2 >= 0) & (s > 0)
    neg = (e0 <= 0) & (e1 <= 0) & (e2 <= 0) & (s < 0)
    inside = pos | neg
    s_safe = tl.where(inside, s, 1.0)
    depth = (e0 * w0 + e1 * w1 + e2 * w2) / s_safe
    near = (e0 * (z0 + w0) + e1 * (z1 + w1) + e2 * (z2 + w2)) / s_safe
    hit = inside & (near >= 0) & (depth > 0)
    bits = tl.where(hit, depth, 1.0).to(tl.int32, bitcast=True).to(tl.int64)
    return hit, (bits << 32) | f.to(tl.int64)


@triton.jit(do_not_specialize=["n_faces", "n_verts"])
def _raster_small_kernel(clip_ptr, faces_ptr, keys_ptr, big_ptr, n_big_ptr, n_faces, n_verts, height, width,
                         hf, wf, eps, SMALL_: tl.constexpr, BLOCK_: tl.constexpr):
    b = tl.program_id(1)
    f = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    valid = f < n_faces
    x0, y0, z0, w0, x1, y1, z1, w1, x2, y2, z2, w2, col0, row0, ncols, nrows = _triangle_setup(
        clip_ptr, faces_ptr, b, f, valid, n_verts, height, width, hf, wf, eps)
    count = ncols * nrows
    small = (count > 0) & (count <= SMALL_)
    steps = tl.max(tl.where(small, count, 0), axis=0)
    ncols_safe = tl.maximum(ncols, 1)
    image = keys_ptr + b.to(tl.int64) * height * width
    for k in range(0, steps):
        col = col0 + k % ncols_safe
        row = row0 + k // ncols_safe
        px = (2 * col + 1).to(tl.float32) / wf - 1.0
        py = 1.0 - (2 * row + 1).to(tl.float32) / hf
        hit, key = _cover_key(x0, y0, z0, w0, x1, y1, z1, w1, x2, y2, z2, w2, px, py, f)
        tl.atomic_min(image + row * width + col, key, mask=small & (k < count) & hit)
    big = count > SMALL_
    slot = tl.atomic_add(n_big_ptr + f * 0, 1, mask=big)
    tl.store(big_ptr + slot, b * n_faces + f, mask=big)


@triton.jit(do_not_specialize=["n_faces", "n_verts"])
def _raster_big_kernel(clip_ptr, faces_ptr, keys_ptr, big_ptr, n_big_ptr, n_faces, n_verts, height, width,
                       hf, wf, eps, TILE_: tl.constexpr):
    n_big = tl.load(n_big_ptr)
    for item in range(tl.program_id(0), n_big, tl.num_programs(0)):
        g = tl.load(big_ptr + item)
        b = g // n_faces
        f = g % n_faces
        x0, y0, z0, w0, x1, y1, z1, w1, x2, y2, z2, w2, col0, row0, ncols, nrows = _triangle_setup(
            clip_ptr, faces_ptr, b, f, f >= 0, n_verts, height, width, hf, wf, eps)
        count = ncols * nrows
        ncols_safe = tl.maximum(ncols, 1)
        image = keys_ptr + b.to(tl.int64) * height * width
        for start in range(0, count, TILE_):
            k = start + tl.arange(0, TILE_)
            col = col0 + k % ncols_safe
            row = row0 + k // ncols_safe
            px = (2 * col + 1).to(tl.float32) / wf - 1.0
            py = 1.0 - (2 * row + 1).to(tl.float32) / hf
            hit, key = _cover_key(x0, y0, z0, w0, x1, y1, z1, w1, x2, y2, z2, w2, px, py, f)
            tl.atomic_min(image + row * width + col, key, mask=(k < count) & hit)


def _num_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@torch.no_grad()
def rasterize_keys_triton(clip: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed depth|id keys [B * H * W] (int64, `BACKGROUND_KEY` where empty), like `rasterize_keys_reference`.

    clip: [B, V, 4] float32 contiguous; faces: [F, 3] int64 contiguous, same device (CUDA, or CPU with
    TRITON_INTERPRET=1).
    """
    n_cam, n_verts = clip.shape[0], clip.shape[1]
    n_faces = faces.shape[0]
    keys = torch.full((n_cam * height * width,), BACKGROUND_KEY, dtype=torch.int64, device=clip.device)
    if n_faces == 0:
        return keys
    if n_cam * n_faces >= 2**31 or n_cam * height * width >= 2**31 or n_cam * n_verts * 4 >= 2**31:
        raise ValueError("rasterize_keys_triton: problem too large for 32-bit indices; split the cameras")
    if clip.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton rasteriser needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    big = torch.empty(n_cam * n_faces, dtype=torch.int32, device=clip.device)
    n_big = torch.zeros(1, dtype=torch.int32, device=clip.device)
    args = (clip, faces, keys, big, n_big, n_faces, n_verts, height, width, float(height), float(width), BBOX_EPS)
    _raster_small_kernel[(triton.cdiv(n_faces, BLOCK), n_cam)](*args, SMALL_=SMALL, BLOCK_=BLOCK)
    _raster_big_kernel[(_num_programs(clip.device),)](*args, TILE_=TILE)
    return keys
