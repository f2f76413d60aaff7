"""Triangle meshes: loading (OBJ, PLY, STL, OFF, GLB/GLTF), cleaning, normalising and saving.

Loading flattens scenes (every part with its node transform applied, all parts concatenated), merges exactly
coincident vertices (glTF splits vertices at UV seams, which would otherwise look like open boundaries), drops
degenerate faces (repeated index or zero area) and unreferenced vertices, and rejects empty meshes and
NaN/Inf coordinates with one `InputError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from focusing.errors import InputError
from focusing.io.atomic import atomic_path

LOAD_FORMATS = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
SAVE_FORMATS = (".obj", ".ply", ".glb")


@dataclass
class Mesh:
    """A triangle mesh. vertices: float64 [V, 3]; faces: int64 [F, 3] (indices into vertices)."""

    vertices: np.ndarray
    faces: np.ndarray

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float64).reshape(-1, 3)
        self.faces = np.ascontiguousarray(self.faces, dtype=np.int64).reshape(-1, 3)

    @property
    def bounds(self) -> np.ndarray:
        """[2, 3]: min and max corner of the axis-aligned bounding box."""
        return np.stack([self.vertices.min(0), self.vertices.max(0)])

    def face_areas(self) -> np.ndarray:
        """[F] triangle areas."""
        return 0.5 * np.linalg.norm(self.face_cross(), axis=1)

    def face_cross(self) -> np.ndarray:
        """[F, 3] (v1 - v0) x (v2 - v0): twice the area times the unit normal."""
        t = self.vertices[self.faces]
        return np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])

    def area(self) -> float:
        return float(self.face_areas().sum())

    def transformed(self, fn) -> "Mesh":
        """A copy whose vertices are `fn(vertices)`, same faces."""
        return Mesh(fn(self.vertices), self.faces.copy())


@dataclass(frozen=True)
class Normalization:
    """The similarity that maps a mesh into [-0.5, 0.5]^3: x_norm = (x - center) * scale.

    center: [3] bounding-box centre of the source; scale: 1 / longest bounding-box side.
    """

    center: tuple[float, float, float]
    scale: float

    @classmethod
    def of(cls, mesh: Mesh, path: str | os.PathLike = "<mesh>") -> "Normalization":
        lo, hi = mesh.bounds
        extent = float((hi - lo).max())
        if not np.isfinite(extent) or extent <= 0.0:
            raise InputError(path, "mesh has zero extent (all vertices coincide)")
        return cls(tuple(float(c) for c in (lo + hi) / 2.0), 1.0 / extent)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """[..., 3] source coordinates -> normalised coordinates."""
        return (np.asarray(points, dtype=np.float64) - np.asarray(self.center)) * self.scale

    def invert(self, points: np.ndarray) -> np.ndarray:
        """[..., 3] normalised coordinates -> source coordinates."""
        return np.asarray(points, dtype=np.float64) / self.scale + np.asarray(self.center)

    def matrix(self) -> np.ndarray:
        """[4, 4] homogeneous form of `apply`."""
        m = np.eye(4)
        m[:3, :3] *= self.scale
        m[:3, 3] = -np.asarray(self.center) * self.scale
        return m


def normalize(mesh: Mesh, path: str | os.PathLike = "<mesh>") -> tuple[Mesh, Normalization]:
    """Centre the bounding box and scale the longest side to 1; returns the mesh and the transform."""
    norm = Normalization.of(mesh, path)
    return mesh.transformed(norm.apply), norm


def clean(mesh: Mesh, path: str | os.PathLike = "<mesh>") -> Mesh:
    """Merge coincident vertices, drop degenerate faces and unreferenced vertices; raise on empty/non-finite."""
    v, f = mesh.vertices, mesh.faces
    if len(f) == 0 or len(v) == 0:
        raise InputError(path, "mesh has no faces")
    if not np.isfinite(v).all():
        raise InputError(path, f"mesh has {int((~np.isfinite(v)).any(1).sum())} vertices with NaN/Inf coordinates")
    if f.min() < 0 or f.max() >= len(v):
        raise InputError(path, "mesh has face indices out of range")
    v, inverse = np.unique(v, axis=0, return_inverse=True)
    f = inverse.reshape(-1)[f]
    repeated = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])
    f = f[~repeated]
    if len(f):
        t = v[f]
        cross = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
        f = f[np.linalg.norm(cross, axis=1) > 0.0]
    if len(f) == 0:
        raise InputError(path, "mesh has no non-degenerate faces")
    used, f = np.unique(f, return_inverse=True)
    return Mesh(v[used], f.reshape(-1, 3))


def load_mesh(path: str | os.PathLike) -> Mesh:
    """Load and clean a mesh file (OBJ, PLY, STL, OFF, GLB, GLTF) in its own units."""
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise InputError(path, "is a folder, not a mesh file")
    if not path.is_file():
        raise InputError(path, "no such file")
    if suffix not in LOAD_FORMATS:
        raise InputError(path, f"unsupported format '{suffix}' (supported: {', '.join(LOAD_FORMATS)})")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    try:
        loaded = trimesh.load(str(path), process=False)
    except ImportError:  # trimesh reaches for an optional module (e.g. to guess a text encoding) on a broken file
        raise InputError(path, f"unreadable {suffix[1:].upper()} file (not a valid {suffix[1:].upper()} file)") from None
    except Exception as exc:  # trimesh raises many exception types for corrupt files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"unreadable {suffix[1:].upper()} file ({msg})") from None
    parts = _triangle_parts(loaded)
    if not parts:
        raise InputError(path, "file contains no triangle mesh")
    offsets = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    vertices = np.concatenate([v for v, _ in parts])
    faces = np.concatenate([f + o for (_, f), o in zip(parts, offsets)])
    return clean(Mesh(vertices, faces), path)


def _triangle_parts(loaded) -> list[tuple[np.ndarray, np.ndarray]]:
    """(vertices, faces) of every triangle mesh in a trimesh object, scene transforms applied."""
    import trimesh

    if isinstance(loaded, trimesh.Trimesh):
        return [(np.asarray(loaded.vertices), np.asarray(loaded.faces))] if len(loaded.faces) else []
    if isinstance(loaded, trimesh.Scene):
        parts = []
        for node in loaded.graph.nodes_geometry:
            transform, name = loaded.graph[node]
            geom = loaded.geometry.get(name)
            if isinstance(geom, trimesh.Trimesh) and len(geom.faces):
                v = np.asarray(geom.vertices, dtype=np.float64)
                v = v @ transform[:3, :3].T + transform[:3, 3]
                f = np.asarray(geom.faces)
                if np.linalg.det(transform[:3, :3]) < 0:  # a mirroring node flips the winding
                    f = f[:, ::-1]
                parts.append((v, f))
        return parts
    return []


def save_mesh(mesh: Mesh, path: str | os.PathLike) -> Path:
    """Write OBJ, PLY or GLB (by suffix) atomically; returns the path."""
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVE_FORMATS:
        raise InputError(path, f"cannot save format '{suffix}' (supported: {', '.join(SAVE_FORMATS)})")
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    with atomic_path(path) as tmp:
        tm.export(str(tmp), file_type=suffix[1:])
    return path
