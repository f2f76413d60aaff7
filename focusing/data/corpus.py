"""A packed training corpus: many normalised meshes in one small safetensors file (`focusing pack`).

The trainer's GPU machine is bare at every call and only 64 MiB travel with the code, so the raw corpus
(900 GLB files, 44 MB) is packed into one file of ~5 MB that `PackedCorpus` reads without pickle.

Each mesh is loaded (`load_mesh`), normalised into [-0.5, 0.5]^3 (`normalize`) and quantised: a coordinate
x becomes q = round((x + 0.5) * 65535) in uint16 and is read back as q / 65535 - 0.5, so every decoded
coordinate is within 0.5 / 65535 = 7.6e-6 of the normalised one (1/64 of a voxel at R = 2048). The
quantised mesh is cleaned again (`clean`: vertices that quantise to one point merge, faces that become
degenerate go), so what is stored is exactly what `mesh(i)` returns. Then, losslessly:
- vertices are renumbered in order of first use by the faces (the mesh is unchanged);
- face indices are coded as index - (largest index before it): with that numbering a new vertex codes as 1,
  a reused one as <= 0, and decoding is vectorised (the running maximum is the count of 1s before);
- vertices are delta-coded along the (new) vertex order, per axis;
- both streams are zigzag-coded to uint32, split into byte planes and compressed with zlib (level 9).

File layout (safetensors; the header metadata key "focusing" holds JSON with format, version, ids, source
keys, sha256 of each source file, the meshes skipped and why, and the settings):

    data           u8  [bytes]   the compressed meshes, one after the other
    offsets        i64 [N + 1]   byte range of mesh i: data[offsets[i]:offsets[i + 1]]
    counts         i64 [N, 2]    (vertices, faces) of mesh i
    normalization  f64 [N, 4]    (cx, cy, cz, scale) of mesh i: x_norm = (x_source - c) * scale

Ids are those of `focusing prepare` (`<stem>-<10 hex>`), so cache and corpus name a mesh the same way.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from focusing.errors import InputError, failure_message
from focusing.io.atomic import atomic_path
from focusing.io.mesh import Mesh, clean, load_mesh, normalize

FORMAT = "focusing-corpus"
FORMAT_VERSION = 1
METADATA_KEY = "focusing"
QUANT_STEPS = 65535
QUANT_ERROR = 0.5 / QUANT_STEPS
"""Largest per-coordinate difference between a decoded vertex and the normalised source vertex."""


def quantize(vertices: np.ndarray) -> np.ndarray:
    """[V, 3] normalised coordinates in [-0.5, 0.5] -> uint16 [V, 3]."""
    return np.round((np.clip(vertices, -0.5, 0.5) + 0.5) * QUANT_STEPS).astype(np.uint16)


def dequantize(q: np.ndarray) -> np.ndarray:
    """uint16 [V, 3] -> float64 [V, 3] in [-0.5, 0.5]."""
    return q.astype(np.float64) / QUANT_STEPS - 0.5


def _zigzag(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    return ((x << 1) ^ (x >> 63)).astype(np.uint32)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.int64)
    return (z >> 1) ^ -(z & 1)


def _planes(a: np.ndarray) -> bytes:
    """uint32 [n] -> its 4 byte planes one after the other (small integers compress far better so)."""
    return a.view(np.uint8).reshape(-1, 4).T.tobytes()


def _unplanes(b: bytes, n: int) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).reshape(4, n).T.copy().view(np.uint32).reshape(-1)


def encode_mesh(q: np.ndarray, faces: np.ndarray) -> bytes:
    """Compress a quantised mesh (uint16 [V, 3], int [F, 3]); `decode_mesh` inverts it up to the vertex
    numbering (first use by the faces), so the mesh is the same."""
    flat = faces.reshape(-1)
    _, first = np.unique(flat, return_index=True)
    order = np.argsort(first, kind="stable")  # old vertex ids in order of first use
    renumber = np.empty(len(q), dtype=np.int64)
    renumber[order] = np.arange(len(order))
    flat = renumber[flat]
    previous_max = np.concatenate([[-1], np.maximum.accumulate(flat)[:-1]])
    face_code = _zigzag(flat - previous_max)
    vertex_code = _zigzag(np.diff(q[order].astype(np.int64), axis=0, prepend=0).reshape(-1))
    return zlib.compress(_planes(vertex_code) + _planes(face_code), 9)


def decode_mesh(blob: bytes, n_vertices: int, n_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_mesh`: (uint16 [V, 3], int64 [F, 3])."""
    raw = zlib.decompress(blob)
    split = 4 * 3 * n_vertices
    q = np.cumsum(_unzigzag(_unplanes(raw[:split], 3 * n_vertices)).reshape(-1, 3), axis=0).astype(np.uint16)
    code = _unzigzag(_unplanes(raw[split:], 3 * n_faces))
    new = code == 1  # exactly the first uses (an old vertex codes as <= 0)
    flat = code + np.cumsum(new) - new - 1
    return q, flat.reshape(-1, 3)


def quantized_mesh(mesh: Mesh, path: str | os.PathLike = "<mesh>") -> tuple[np.ndarray, np.ndarray]:
    """A normalised mesh as it is stored: (uint16 [V, 3], int64 [F, 3]), cleaned after quantisation."""
    cleaned = clean(Mesh(dequantize(quantize(mesh.vertices)), mesh.faces), path)
    return quantize(cleaned.vertices), cleaned.faces


@dataclass
class PackReport:
    """What `pack_corpus` did: meshes packed, skipped (with reasons), output size and time."""

    path: Path
    packed: int = 0
    skipped: list[dict] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    faces: int = 0
    vertices: int = 0


def pack_corpus(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    max_faces: int | None = None,
    exclude: list[str | os.PathLike] = (),
    progress: bool = False,
) -> PackReport:
    """Pack the meshes found in `inputs` (files or folders, as `focusing prepare` finds them) into `out`.

    Meshes that fail to load, meshes with more than `max_faces` faces (None: no limit; they are skipped, not
    simplified), and meshes held out by `exclude` (MANIFEST.tsv files, folders or files; see
    `focusing.data.holdout`) are logged to stderr and skipped. Written atomically.
    """
    from safetensors.numpy import save_file

    from focusing.data.holdout import HeldOut
    from focusing.data.prepare import file_sha256, find_items

    start = time.perf_counter()
    held = HeldOut.from_paths(exclude)
    report = PackReport(Path(out))
    blobs, counts, norms, ids, keys, digests = [], [], [], [], [], []
    for n, item in enumerate(find_items(inputs)):
        try:
            digest = file_sha256(item.path)
            mesh = load_mesh(item.path)
            reason = held.reason(item.path, digest, mesh) if held else None
            if reason is None and max_faces is not None and len(mesh.faces) > max_faces:
                reason = f"{len(mesh.faces)} faces > max_faces {max_faces}"
            if reason is None:
                normalised, norm = normalize(mesh, item.path)
                q, faces = quantized_mesh(normalised, item.path)
        except Exception as exc:  # noqa: BLE001  (a batch goes on: log any failure)
            reason = failure_message(exc)
        if reason is not None:
            report.skipped.append({"source": item.path, "reason": reason})
            print(f"focusing pack: skipped {item.path}: {reason}", file=sys.stderr)
            continue
        blobs.append(encode_mesh(q, faces))
        counts.append((len(q), len(faces)))
        norms.append((*norm.center, norm.scale))
        ids.append(item.id)
        keys.append(item.key)
        digests.append(digest)
        if progress and (n + 1) % 100 == 0:
            print(f"focusing pack: {n + 1} meshes read", file=sys.stderr)
    if not blobs:
        raise InputError(inputs[0] if inputs else ".", "no mesh could be packed")
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    tensors = {
        "data": np.frombuffer(b"".join(blobs), dtype=np.uint8),
        "offsets": offsets,
        "counts": np.asarray(counts, dtype=np.int64),
        "normalization": np.asarray(norms, dtype=np.float64),
    }
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "quantization": QUANT_STEPS,
        "max_faces": max_faces,
        "ids": ids,
        "keys": keys,
        "sha256": digests,
        "skipped": report.skipped,
    }
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    report.packed = len(blobs)
    report.vertices, report.faces = (int(s) for s in tensors["counts"].sum(0))
    report.bytes = Path(out).stat().st_size
    report.seconds = time.perf_counter() - start
    return report


def is_packed_corpus(path: str | os.PathLike) -> bool:
    """Whether `path` is a file written by `pack_corpus` (reads the header only)."""
    return read_corpus_meta(path) is not None


def read_corpus_meta(path: str | os.PathLike) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "null"))
    except Exception:  # noqa: BLE001  (not a safetensors file)
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


class PackedCorpus:
    """Reads a packed corpus (no pickle): `len`, `ids`, `keys`, `sha256`, and `mesh(i)` -> normalised `Mesh`
    (float64 vertices within `QUANT_ERROR` of the normalised source mesh, int64 faces), decoded on demand."""

    def __init__(self, path: str | os.PathLike):
        from safetensors.numpy import load_file

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "no such corpus file")
        meta = read_corpus_meta(self.path)
        if meta is None:
            raise InputError(self.path, f"not a packed corpus (no '{FORMAT}' header; write one with focusing pack)")
        if meta["version"] > FORMAT_VERSION or meta["quantization"] != QUANT_STEPS:
            raise InputError(self.path, f"corpus format version {meta['version']} is newer than this focusing's")
        t = load_file(str(self.path))
        self._data, self._offsets, self._counts = t["data"], t["offsets"], t["counts"]
        self.normalization = t["normalization"]
        self.ids: list[str] = meta["ids"]
        self.keys: list[str] = meta["keys"]
        self.sha256: list[str] = meta["sha256"]
        self.skipped: list[dict] = meta["skipped"]

    def __len__(self) -> int:
        return len(self.ids)

    def mesh(self, i: int) -> Mesh:
        blob = self._data[self._offsets[i] : self._offsets[i + 1]].tobytes()
        q, faces = decode_mesh(blob, int(self._counts[i, 0]), int(self._counts[i, 1]))
        return Mesh(dequantize(q), faces)
