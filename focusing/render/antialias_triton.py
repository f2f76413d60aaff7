"""Triton fast path of the silhouette search (`focusing.render.antialias.find_silhouette_crossings`).

One kernel, one lane per (pixel, direction): the pair (pixel, right neighbour) or (pixel, lower neighbour). A
lane whose two pixels show different triangles walks across the front triangle's surface towards the other
pixel, exactly like the reference (same arithmetic, same order), for at most `max_steps` faces, and writes the
silhouette edge it finds (two vertex ids) to a dense [2, B*H*W] buffer (-1 where none). The pairs are then
compacted with one `nonzero`. Runs on CUDA, and on CPU tensors under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from focusing.render.antialias import EDGE_EPS, SilhouetteCrossings

BLOCK = 128


@triton.jit
def _signbit(x):
    return x.to(tl.int32, bitcast=True) < 0


@triton.jit
def _frame(points_ptr, vid, valid, ax, ay, a0, bx, by, b0):
    """Vertex `vid` (flat index into [B*V]) in the pair frame: (X, Y, ok)."""
    x = tl.load(points_ptr + vid * 4 + 0, mask=valid, other=0.0)
    y = tl.load(points_ptr + vid * 4 + 1, mask=valid, other=0.0)
    w = tl.load(points_ptr + vid * 4 + 3, mask=valid, other=1.0)
    ok = w > 0
    w = tl.where(ok, w, 1.0)
    sx = x / w
    sy = y / w
    return ax * sx + ay * sy + a0, bx * sx + by * sy + b0, ok


@triton.jit
def _edge(xa, ya, xb, yb, opposite_corner, entry):
    """Whether the edge a -> b crosses the pair axis (and is not the entry edge) and where."""
    crosses = (_signbit(ya) != _signbit(yb)) & (ya != yb) & (opposite_corner != entry)
    x = xa - ya * (xb - xa) / tl.where(crosses, yb - ya, 1.0)
    return crosses, x


@triton.jit(do_not_specialize=["n_verts"])
def _walk_kernel(tri_ptr, depth_ptr, points_ptr, faces_ptr, table_ptr, out_ptr, n_pix, n_verts, height, width,
                 hf, wf, eps, MAX_STEPS: tl.constexpr, BLOCK_: tl.constexpr):
    vertical = tl.program_id(1) == 1
    p0 = tl.program_id(0) * BLOCK_ + tl.arange(0, BLOCK_)
    hw = height * width
    r = p0 % hw
    row = r // width
    col = r % width
    inside = (p0 < n_pix) & tl.where(vertical, row < height - 1, col < width - 1)
    p1 = p0 + tl.where(vertical, width, 1)
    t0 = tl.load(tri_ptr + p0, mask=inside, other=-1)
    t1 = tl.load(tri_ptr + p1, mask=inside, other=-1)
    d0 = tl.load(depth_ptr + p0, mask=inside, other=0.0)
    d1 = tl.load(depth_ptr + p1, mask=inside, other=0.0)
    active = inside & (t0 != t1)
    use1 = (t0 < 0) | ((t1 >= 0) & (d1 < d0))
    face = tl.where(use1, t1, t0)
    target = tl.where(use1, t0, t1)
    entry = tl.zeros_like(face) - 1
    # pair frame of the front pixel (same coefficients as `pair_frames`)
    origin = tl.where(use1, p1, p0)
    ro = origin % hw
    u0 = (ro % width).to(tl.float32) + 0.5
    v0 = (ro // width).to(tl.float32) + 0.5
    sign = tl.where(use1, -1.0, 1.0)
    hu = wf * 0.5
    hv = hf * 0.5
    ax = tl.where(vertical, 0.0, sign * hu)
    ay = tl.where(vertical, -sign * hv, 0.0)
    a0 = sign * tl.where(vertical, hv - v0, hu - u0)
    bx = tl.where(vertical, hu, 0.0)
    by = tl.where(vertical, 0.0, 0.0 - hv)
    b0 = tl.where(vertical, hu - u0, hv - v0)
    base = (origin // hw).to(tl.int64) * n_verts
    res_a = tl.zeros_like(face) - 1
    res_b = tl.zeros_like(face) - 1
    for _ in range(0, MAX_STEPS):
        if tl.max(active.to(tl.int32), axis=0) > 0:    # skip blocks whose walks have all ended
            f = tl.where(active, face, 0).to(tl.int64)
            c0 = tl.load(faces_ptr + f * 3 + 0, mask=active, other=0)
            c1 = tl.load(faces_ptr + f * 3 + 1, mask=active, other=0)
            c2 = tl.load(faces_ptr + f * 3 + 2, mask=active, other=0)
            x0, y0, ok0 = _frame(points_ptr, base + c0, active, ax, ay, a0, bx, by, b0)
            x1, y1, ok1 = _frame(points_ptr, base + c1, active, ax, ay, a0, bx, by, b0)
            x2, y2, ok2 = _frame(points_ptr, base + c2, active, ax, ay, a0, bx, by, b0)
            e0, cx0 = _edge(x1, y1, x2, y2, c0, entry)          # edge k runs corner k+1 -> corner k+2
            e1, cx1 = _edge(x2, y2, x0, y0, c1, entry)
            e2, cx2 = _edge(x0, y0, x1, y1, c2, entry)
            c = tl.where(e0, cx0, -float("inf"))
            k = tl.zeros_like(c0)
            better = e1 & (cx1 > c)
            c = tl.where(better, cx1, c)
            k = tl.where(better, 1, k)
            better = e2 & (cx2 > c)
            c = tl.where(better, cx2, c)
            k = tl.where(better, 2, k)
            alive = (e0 | e1 | e2) & ok0 & ok1 & ok2 & (c <= 1.0 + eps)
            nbr = tl.load(table_ptr + f * 6 + k, mask=active, other=-1)
            opp = tl.load(table_ptr + f * 6 + 3 + k, mask=active, other=-1)
            boundary = nbr < 0
            ox, oy, o_ok = _frame(points_ptr, base + tl.maximum(opp, 0), active, ax, ay, a0, bx, by, b0)
            # own corner k, and the edge's ends (corners k+1, k+2)
            kx = tl.where(k == 0, x0, tl.where(k == 1, x1, x2))
            ky = tl.where(k == 0, y0, tl.where(k == 1, y1, y2))
            ea_x = tl.where(k == 0, x1, tl.where(k == 1, x2, x0))
            ea_y = tl.where(k == 0, y1, tl.where(k == 1, y2, y0))
            eb_x = tl.where(k == 0, x2, tl.where(k == 1, x0, x1))
            eb_y = tl.where(k == 0, y2, tl.where(k == 1, y0, y1))
            inner = (ea_x - kx) * (eb_y - ky) - (ea_y - ky) * (eb_x - kx)
            wing = (ea_x - ox) * (eb_y - oy) - (ea_y - oy) * (eb_x - ox)
            silhouette = boundary | (_signbit(inner) == _signbit(wing))
            usable = tl.abs(eb_y - ea_y) >= tl.abs(eb_x - ea_x)
            done = active & alive & silhouette & (boundary | o_ok) & usable & (c >= -eps)
            res_a = tl.where(done, tl.where(k == 0, c1, tl.where(k == 1, c2, c0)), res_a)
            res_b = tl.where(done, tl.where(k == 0, c2, tl.where(k == 1, c0, c1)), res_b)
            walk = active & alive & (~silhouette) & o_ok & (nbr != target)
            face = tl.where(walk, nbr, face)
            entry = tl.where(walk, opp, entry)
            active = walk
    out = out_ptr + tl.program_id(1).to(tl.int64) * 2 * n_pix
    tl.store(out + p0, res_a, mask=p0 < n_pix)
    tl.store(out + n_pix + p0, res_b, mask=p0 < n_pix)


@torch.no_grad()
def find_silhouette_crossings_triton(tri_id: torch.Tensor, depth: torch.Tensor, clip: torch.Tensor,
                                     faces: torch.Tensor, table: torch.Tensor, max_steps: int) -> SilhouetteCrossings:
    """Same result as `find_silhouette_crossings` (up to floating-point contraction on GPUs).

    tri_id [B, H, W] int64; depth [B, H, W]; clip [B, V, 4]; faces [F, 3] int64; table: `MeshTopology.table`.
    """
    if tri_id.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton silhouette search needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    n_cam, height, width = tri_id.shape
    n_pix = n_cam * height * width
    tri = tri_id.reshape(-1).contiguous()
    d = depth.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(2, 2, n_pix, dtype=torch.int64, device=tri.device)
    _walk_kernel[(triton.cdiv(n_pix, BLOCK), 2)](
        tri, d, clip.to(torch.float32).contiguous(),
        faces.contiguous(), table.contiguous(), out, n_pix, clip.shape[1], height, width, float(height),
        float(width), EDGE_EPS, MAX_STEPS=max_steps, BLOCK_=BLOCK)
    hit = torch.nonzero(out[:, 0].reshape(-1) >= 0).squeeze(1)
    vertical = torch.div(hit, n_pix, rounding_mode="floor")
    p0 = hit - vertical * n_pix
    p1 = p0 + torch.where(vertical > 0, width, 1)
    t0, t1 = tri.index_select(0, p0), tri.index_select(0, p1)
    use1 = (t0 < 0) | ((t1 >= 0) & (d.index_select(0, p1) < d.index_select(0, p0)))
    return SilhouetteCrossings(p0, p1, torch.where(use1, p1, p0), out[:, 0].reshape(-1).index_select(0, hit),
                               out[:, 1].reshape(-1).index_select(0, hit))
