"""Held-out meshes (the validation set) that training data must never contain, and the test that finds them.

`HeldOut.from_paths(paths)` reads any mix of
- a `MANIFEST.tsv` (tab-separated, header row; the shared validation set's format): the names in its `file`
  and `source_path` columns and the digests in its `sha256` column; the listed files that sit beside it are
  also loaded for their geometry;
- a folder: every mesh file in it (recursively), by name, sha256 and geometry, plus a MANIFEST.tsv inside it;
- a mesh file: by name, sha256 and geometry.

A training mesh is held out when any of these match (`HeldOut.reason`):
- name: its file stem equals a held-out stem, case-insensitively (conservative: a same-named different
  mesh is excluded too; the validation set was converted from other formats, e.g. toaster.glb -> toaster.ply,
  so the byte digest alone would miss it);
- sha256 of the file's bytes;
- geometry: the same vertex and face counts and the same normalised vertex set, compared per axis on the
  sorted coordinates (order-free, robust to float32 rounding) within `GEOMETRY_TOLERANCE`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from focusing.data.prepare import file_sha256
from focusing.errors import InputError
from focusing.io.mesh import LOAD_FORMATS, Mesh, load_mesh, normalize

MANIFEST = "MANIFEST.tsv"
GEOMETRY_TOLERANCE = 1e-4
"""Largest difference of sorted normalised coordinates for two meshes to count as the same geometry."""


def geometry_signature(mesh: Mesh) -> tuple[tuple[int, int], np.ndarray]:
    """((V, F), [V, 3] float32: each axis of the normalised vertices sorted): an order-free fingerprint."""
    normalised, _ = normalize(mesh)
    return (len(mesh.vertices), len(mesh.faces)), np.sort(normalised.vertices, axis=0).astype(np.float32)


@dataclass
class HeldOut:
    """Names (lower-case stems), sha256 digests and geometry signatures of held-out meshes."""

    stems: set[str] = field(default_factory=set)
    digests: set[str] = field(default_factory=set)
    shapes: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def from_paths(cls, paths) -> "HeldOut":
        held = cls()
        for given in paths:
            path = Path(given)
            if path.is_dir():
                for f in sorted(path.rglob("*")):
                    if f.name == MANIFEST:
                        held._add_manifest(f)
                    elif f.is_file() and f.suffix.lower() in LOAD_FORMATS:
                        held._add_file(f)
            elif path.is_file() and path.name.lower().endswith(".tsv"):
                held._add_manifest(path)
                for name in held._manifest_files(path):
                    if (path.parent / name).is_file():
                        held._add_file(path.parent / name)
            elif path.is_file():
                held._add_file(path)
            else:
                raise InputError(path, "no such held-out file or folder")
        return held

    def __bool__(self) -> bool:
        return bool(self.stems or self.digests or self.shapes)

    def reason(self, path: str | os.PathLike | None = None, sha256: str | None = None, mesh: Mesh | None = None):
        """Why a mesh (any of its file path, digest, loaded mesh) is held out, or None if it is not."""
        if path is not None and Path(path).stem.lower() in self.stems:
            return f"held out by name ({Path(path).stem})"
        if sha256 is not None and sha256 in self.digests:
            return "held out by sha256"
        if mesh is not None and self.shapes:
            key, sig = geometry_signature(mesh)
            for other in self.shapes.get(key, []):
                if float(np.abs(other - sig).max()) <= GEOMETRY_TOLERANCE:
                    return "held out by geometry (same mesh as a held-out one)"
        return None

    def _add_file(self, path: Path) -> None:
        self.stems.add(path.stem.lower())
        self.digests.add(file_sha256(path))
        try:
            key, sig = geometry_signature(load_mesh(path))
        except InputError:
            return  # an unreadable held-out file still counts by name and digest
        self.shapes.setdefault(key, []).append(sig)

    def _add_manifest(self, path: Path) -> None:
        for row in self._rows(path):
            for column in ("file", "source_path"):
                if row.get(column):
                    self.stems.add(Path(row[column]).stem.lower())
            if row.get("sha256"):
                self.digests.add(row["sha256"].strip().lower())

    def _manifest_files(self, path: Path) -> list[str]:
        return [row["file"] for row in self._rows(path) if row.get("file")]

    @staticmethod
    def _rows(path: Path) -> list[dict]:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows and not ({"file", "source_path", "sha256"} & set(rows[0])):
            raise InputError(path, "manifest has none of the columns file, source_path, sha256")
        return rows
