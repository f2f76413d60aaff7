"""`render_mesh`: rasterise -> interpolate -> antialias. Depth, world normals and mask of a mesh for a batch of
cameras, differentiable w.r.t. the vertex positions (GT meshes of millions of faces: call it under no_grad)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from focusing.render.antialias import MeshTopology
from focusing.render.antialias import antialias as antialias_image
from focusing.render.camera import Camera
from focusing.render.interpolate import interpolate
from focusing.render.raster import clip_space, rasterize

Tensor = torch.Tensor


@dataclass
class RenderOutput:
    """depth [B, H, W] (-z_camera, 0 background), normal [B, H, W, 3] (unit world-space face normal facing the
    camera, 0 background), mask [B, H, W] (coverage in [0, 1]), tri_id [B, H, W] int64 (-1 background).

    With antialiasing, silhouette pixels hold blends of the surface and the background (depth and normal fade
    to 0 with the mask; divide by the mask to recover them)."""

    depth: Tensor
    normal: Tensor
    mask: Tensor
    tri_id: Tensor


def render_mesh(vertices: Tensor, faces: Tensor, camera: Camera, *, antialias: bool = True, backend: str = "auto",
                topology: MeshTopology | None = None) -> RenderOutput:
    """Render `vertices` [V, 3] / `faces` [F, 3] from `camera` (B views).

    Visibility and the silhouette search run without autograd (backend: "auto" = Triton kernels on CUDA,
    "torch" = the PyTorch reference, "triton"); depth,
    normal and mask are then recomputed with autograd, in the vertices' dtype (float32 or float64).
    antialias: blend silhouettes so the mask (and depth/normal at edges) get gradients w.r.t. vertices.
    topology: `mesh_topology(faces)` for the antialiasing; built if None and cached per `faces` tensor object
    (pass the same int64 faces tensor, on the vertices' device, to reuse it across calls).
    Geometry is float32 / float64 whatever autocast is on outside (a bf16 clip space would misplace pixels).
    """
    vertices = torch.as_tensor(vertices)
    with torch.autocast(vertices.device.type, enabled=False):
        return _render(vertices, faces, camera, antialias, backend, topology)


def _render(vertices: Tensor, faces: Tensor, camera: Camera, antialias: bool, backend: str,
            topology: MeshTopology | None) -> RenderOutput:
    if vertices.dtype not in (torch.float32, torch.float64):
        vertices = vertices.to(torch.float32)
    faces = torch.as_tensor(faces, device=vertices.device).to(torch.int64)
    camera = camera.to(device=vertices.device, dtype=vertices.dtype)
    mvp = camera.mvp()
    with torch.no_grad():
        clip = clip_space(vertices.detach(), mvp)
        tri_id = rasterize(clip, faces, camera.height, camera.width, backend=backend)
    image = interpolate(vertices, faces, camera, tri_id)
    if antialias and len(faces):
        image = antialias_image(image, tri_id, vertices, faces, mvp, topology=topology, clip=clip, backend=backend)
    return RenderOutput(image[..., 0], image[..., 1:4], image[..., 4], tri_id)

