"""Differentiable mesh rendering: cameras, rasterisation, interpolation, silhouette antialiasing, images.

Conventions (camera frames, pixels, NDC, depth) are in `focusing.render.camera` and docs/CONVENTIONS.md.
"""

from focusing.render.camera import Camera, look_at, perspective, random_cameras, zoom_crop
from focusing.render.renderer import RenderOutput, render_mesh

__all__ = ["Camera", "RenderOutput", "look_at", "perspective", "random_cameras", "render_mesh", "zoom_crop"]
