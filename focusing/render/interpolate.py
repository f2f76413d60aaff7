"""Interpolation with autograd: depth, face normal and mask at the covered pixels of a rasterised image.

The rasteriser fixes which triangle each pixel sees (no gradient through visibility). Here, for the covered
pixels only, the triangle's world vertices are gathered *with autograd*, projected with the camera, and the
perspective-correct barycentrics of the pixel centre are recomputed (same homogeneous algebra as
`focusing.render.raster.coverage`), so gradients reach the vertex positions:

- depth: -z_camera of the 3D hit point sum_k b_k v_k (positive; 0 on the background),
- normal: the unit face normal in **world space**, flipped to face the camera (dot(n, eye - v0) > 0; the sign
  is constant over a triangle for a pinhole camera), 0 on the background,
- mask: 1 where covered, 0 elsewhere (its gradients come from `focusing.render.antialias`).
"""

from __future__ import annotations

import torch

from focusing.device import fused
from focusing.render.camera import Camera

Tensor = torch.Tensor


def pixel_ndc(pix: Tensor, height: int, width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Flat pixel indices [P] into [B, H, W] -> (camera index [P], NDC x [P], NDC y [P]) of the pixel centres."""
    hw = height * width
    b, r = pix // hw, pix % hw
    px = (2 * (r % width) + 1).to(dtype) / width - 1
    py = 1 - (2 * (r // width) + 1).to(dtype) / height
    return b, px, py


def project_points(points: Tensor, mvp: Tensor) -> Tensor:
    """Points [P, K, 3] through per-row matrices `mvp` [P, 4, 4] -> clip coordinates [P, K, 4]."""
    return points @ mvp[:, :, :3].transpose(1, 2) + mvp[:, None, :, 3]


def barycentrics(clip: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Perspective-correct barycentrics [P, 3] of pixel centres (px, py) [P] in triangles `clip` [P, 3, 4]."""
    ax = clip[..., 0] - px[:, None] * clip[..., 3]
    ay = clip[..., 1] - py[:, None] * clip[..., 3]
    nxt, prv = [1, 2, 0], [2, 0, 1]
    e = ax[:, nxt] * ay[:, prv] - ay[:, nxt] * ax[:, prv]   # E_k = a_{k+1} x a_{k+2}
    s = e.sum(dim=1, keepdim=True)
    return e / torch.where(s == 0, torch.ones_like(s), s)


def pixel_barycentrics(clip: Tensor, faces: Tensor, tri_id: Tensor) -> Tensor:
    """Perspective-correct barycentrics [B, H, W, 3] of every pixel centre in its triangle (0 on the background),
    differentiable w.r.t. the clip-space vertices `clip` [B, V, 4] (the nvdiffrast-style raster output together
    with `tri_id` [B, H, W])."""
    n_cam, height, width = tri_id.shape
    flat = tri_id.reshape(-1)
    pix = torch.nonzero(flat >= 0).squeeze(1)
    b, px, py = pixel_ndc(pix, height, width, clip.dtype)
    ids = faces.index_select(0, flat.index_select(0, pix))                # [P, 3]
    tri = clip.reshape(-1, 4).index_select(0, (b[:, None] * clip.shape[1] + ids).view(-1)).view(-1, 3, 4)
    out = clip.new_zeros(n_cam * height * width, 3).index_put((pix,), barycentrics(tri, px, py))
    return out.view(n_cam, height, width, 3)


def face_normals_toward(tri: Tensor, eye: Tensor) -> Tensor:
    """Unit normals [P, 3] of triangles `tri` [P, 3, 3], flipped to face the points `eye` [P, 3]."""
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    facing = ((eye - tri[:, 0]) * n).sum(-1, keepdim=True)
    return torch.where(facing < 0, -n, n)


def fragment_values(corners: Tensor, pix: Tensor, view: Tensor, proj: Tensor, height: int, width: int) -> Tensor:
    """Per covered pixel: (depth, normal xyz, 1) [P, 5] from its triangle's world corners [P, 3, 3], its flat
    index `pix` [P] into [B, H, W] and the cameras' view / proj matrices [B, 4, 4]. Pure tensor math (one
    fusable graph for torch.compile)."""
    b, px, py = pixel_ndc(pix, height, width, corners.dtype)
    eye = -(view[:, :3, :3].transpose(1, 2) @ view[:, :3, 3:])[..., 0]   # camera centres [B, 3]
    bary = barycentrics(project_points(corners, (proj @ view)[b]), px, py)   # [P, 3]
    point = (bary[..., None] * corners).sum(1)                            # [P, 3]
    view_z = view[:, 2][b]                                                # [P, 4]
    depth = -((point * view_z[:, :3]).sum(-1) + view_z[:, 3])
    normal = face_normals_toward(corners, eye[b])
    return torch.cat([depth[:, None], normal, torch.ones_like(depth)[:, None]], dim=1)


def interpolate(vertices: Tensor, faces: Tensor, camera: Camera, tri_id: Tensor) -> Tensor:
    """Differentiable G-buffer of a rasterised view.

    vertices [V, 3] (float32/64, may require grad), faces [F, 3] long, tri_id [B, H, W] from `rasterize`.
    Returns [B, H, W, 5] = (depth, normal xyz, mask), zero on the background, in `vertices`' dtype.
    """
    n_cam, height, width = tri_id.shape
    flat = tri_id.reshape(-1)
    pix = torch.nonzero(flat >= 0).squeeze(1)
    ids = faces.index_select(0, flat.index_select(0, pix)).view(-1)
    corners = vertices.index_select(0, ids).view(-1, 3, 3)               # [P, 3, 3] (backward: index_add)
    values = fused(fragment_values)(corners, pix, camera.view, camera.proj, height, width)
    out = vertices.new_zeros(n_cam * height * width, 5).index_put((pix,), values)
    return out.view(n_cam, height, width, 5)
