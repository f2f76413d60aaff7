"""Differentiable mesh rendering: cameras, rasterisation, interpolation, silhouette antialiasing, images.

Conventions (camera frames, pixels, NDC, depth) are in `focusing.render.camera` and docs/CONVENTIONS.md.
"""

from focusing.render.antialias import MeshTopology, mesh_topology
from focusing.render.camera import Camera, look_at, perspective, random_cameras, zoom_crop
from focusing.render.renderer import RenderOutput, render_mesh, use_torch_compile

__all__ = ["Camera", "MeshTopology", "RenderOutput", "look_at", "mesh_topology", "perspective", "random_cameras",
           "render_mesh", "use_torch_compile", "zoom_crop"]
