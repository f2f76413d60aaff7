"""Mesh input/output: load, clean, normalise into [-0.5, 0.5]^3, save."""

from focusing.io.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from focusing.io.mesh import LOAD_FORMATS, SAVE_FORMATS, Mesh, Normalization, clean, load_mesh, normalize, save_mesh

__all__ = [
    "LOAD_FORMATS",
    "SAVE_FORMATS",
    "Mesh",
    "Normalization",
    "atomic_path",
    "clean",
    "load_mesh",
    "normalize",
    "save_mesh",
    "write_bytes_atomic",
    "write_text_atomic",
]
