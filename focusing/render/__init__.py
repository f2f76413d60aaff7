"""Differentiable mesh rendering: cameras, rasterisation, interpolation, silhouette antialiasing, images.

`render_mesh(vertices, faces, camera)` -> depth, world normals, antialiased mask, triangle ids; gradients reach
the vertices. Pipeline: `raster` (visibility, no grad; PyTorch reference or the Triton kernels of
`raster_triton` on CUDA) -> `interpolate` (per-pixel values with autograd) -> `antialias` (silhouette search,
Triton on CUDA via `antialias_triton`, then a differentiable blend). Conventions (camera frames, pixels, NDC,
depth) are in `focusing.render.camera` and docs/CONVENTIONS.md.
"""

from focusing.render.antialias import MeshTopology, mesh_topology
from focusing.render.camera import Camera, look_at, perspective, random_cameras, zoom_crop
from focusing.render.renderer import RenderOutput, render_mesh

__all__ = ["Camera", "MeshTopology", "RenderOutput", "look_at", "mesh_topology", "perspective", "random_cameras",
           "render_mesh", "zoom_crop"]
