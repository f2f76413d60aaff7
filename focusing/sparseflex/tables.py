"""Dual Marching Cubes tables, generated here from the 256 corner-sign configurations of a cube.

Nothing is pasted: every table below is computed at import time from the cube's geometry.

Cube layout (matches `focusing.data.grid.CORNER_OFFSETS`, x fastest):
- corner k sits at offset (k & 1, (k >> 1) & 1, (k >> 2) & 1);
- edge e = 4 * axis + j runs along `axis` (0 = x, 1 = y, 2 = z) from corner `EDGE_CORNERS[e, 0]` (its lower end)
  to `EDGE_CORNERS[e, 1] = lower | (1 << axis)`; the lower ends of the four edges of an axis are the corners
  with that axis bit clear, in increasing order (x: 0 2 4 6, y: 0 1 4 5, z: 0 1 2 3);
- the case id of a cube is sum_k [s_k < 0] << k (bit k set = corner k inside; SDF negative inside).

Dual vertices (Nielson's Dual Marching Cubes, as used by FlexiCubes): the crossed edges of a cube (endpoints of
opposite sign) are grouped into connected components through the cube's six faces. On a face with two crossed
edges the two are linked. On an *ambiguous* face (four crossed edges, diagonal corners of equal sign) each
inside corner keeps its own pair of edges: the inside corners stay separated. Each component is one dual vertex.
This gives 0:2, 1:162, 2:82, 3:8, 4:2 cubes by dual-vertex count.

Ambiguity (FlexiCubes' cases C16/C19): a case with exactly one ambiguous face and a single dual vertex joins the
two inside corners of that face through the cube's interior, while the neighbour across the face may separate
them. Such cases (36) are flagged with the face's outward direction; when the neighbour across that face is
flagged as well, both cubes use the complement case 255 - c (same crossed edges, the other grouping), so the two
cubes agree on the shared face.

Quads: the four cubes around an edge along `axis` hold it as their edges 4 * axis + j, j = 0..3.
`QUAD_CYCLE[axis]` lists the j in counter-clockwise order seen from +axis, so the quad of dual vertices taken in
that order has its normal along +axis.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


def _corner_offsets() -> np.ndarray:
    """[8, 3] int: offset of corner k (x fastest)."""
    return np.array([[(k >> a) & 1 for a in range(3)] for k in range(8)], dtype=np.int64)


def _edge_corners() -> np.ndarray:
    """[12, 2] int: (lower, upper) corner of edge e = 4 * axis + j."""
    edges = []
    for axis in range(3):
        lower = [k for k in range(8) if not (k >> axis) & 1]
        edges += [(k, k | (1 << axis)) for k in lower]
    return np.array(edges, dtype=np.int64)


def _faces() -> list[tuple[int, int, list[int]]]:
    """The 6 cube faces as (axis, side, the 4 edge indices lying in the face)."""
    edges = _edge_corners()
    faces = []
    for axis in range(3):
        for side in (0, 1):
            on_face = [e for e in range(12) if all(((c >> axis) & 1) == side for c in edges[e])]
            faces.append((axis, side, on_face))
    return faces


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _dual_vertices(case: int) -> tuple[np.ndarray, int, list[tuple[int, int]]]:
    """For one case: edge -> dual-vertex index [12] (-1 = not crossed), dual-vertex count, ambiguous faces."""
    edges = _edge_corners()
    inside = [(case >> k) & 1 for k in range(8)]
    crossed = [inside[a] != inside[b] for a, b in edges]
    parent = list(range(12))
    ambiguous = []
    for axis, side, face_edges in _faces():
        cut = [e for e in face_edges if crossed[e]]
        if len(cut) == 2:
            parent[_find(parent, cut[0])] = _find(parent, cut[1])
        elif len(cut) == 4:
            ambiguous.append((axis, side))
            corners = {c for e in face_edges for c in edges[e]}
            for c in sorted(corners):
                if inside[c]:  # keep each inside corner separated: link its two edges only
                    pair = [e for e in face_edges if c in edges[e]]
                    parent[_find(parent, pair[0])] = _find(parent, pair[1])
    roots = sorted({_find(parent, e) for e in range(12) if crossed[e]}, key=lambda r: min(
        e for e in range(12) if crossed[e] and _find(parent, e) == r))
    edge_to_vd = np.full(12, -1, dtype=np.int64)
    for e in range(12):
        if crossed[e]:
            edge_to_vd[e] = roots.index(_find(parent, e))
    return edge_to_vd, len(roots), ambiguous


def _quad_cycle() -> np.ndarray:
    """[3, 4]: for each axis, the local edge slots j in counter-clockwise order around +axis."""
    offsets = _corner_offsets()
    edges = _edge_corners()
    cycles = []
    for axis in range(3):
        u, v = (axis + 1) % 3, (axis + 2) % 3
        angles = []
        for j in range(4):
            lower = offsets[edges[4 * axis + j, 0]]
            # the cube holding the edge at this slot lies on the opposite side of the edge: centre - edge point
            du, dv = 0.5 - lower[u], 0.5 - lower[v]
            angles.append(np.arctan2(dv, du))
        cycles.append(np.argsort(angles))
    return np.array(cycles, dtype=np.int64)


def _build() -> dict[str, np.ndarray]:
    edge_to_vd = np.zeros((256, 12), dtype=np.int64)
    num_vd = np.zeros(256, dtype=np.int64)
    flagged = np.zeros(256, dtype=bool)
    face_dir = np.zeros((256, 3), dtype=np.int64)
    for case in range(256):
        edge_to_vd[case], num_vd[case], ambiguous = _dual_vertices(case)
        if len(ambiguous) == 1 and num_vd[case] == 1:
            axis, side = ambiguous[0]
            flagged[case] = True
            face_dir[case, axis] = 2 * side - 1
    return {
        "corner_offsets": _corner_offsets(),
        "edge_corners": _edge_corners(),
        "edge_to_vd": edge_to_vd,
        "num_vd": num_vd,
        "ambiguous_flag": flagged,
        "ambiguous_dir": face_dir,
        "quad_cycle": _quad_cycle(),
    }


_TABLES = _build()

EDGE_CORNERS = torch.from_numpy(_TABLES["edge_corners"])
"""[12, 2] int64: (lower, upper) corner of edge e = 4 * axis + j."""
EDGE_AXIS = torch.arange(12) // 4
"""[12] int64: axis of edge e."""
EDGE_TO_DUAL = torch.from_numpy(_TABLES["edge_to_vd"])
"""[256, 12] int64: index (within the cube) of the dual vertex that crossed edge e joins; -1 if not crossed."""
NUM_DUAL = torch.from_numpy(_TABLES["num_vd"])
"""[256] int64: number of dual vertices of each case."""
AMBIGUOUS_FLAG = torch.from_numpy(_TABLES["ambiguous_flag"])
"""[256] bool: one ambiguous face and one dual vertex (C16/C19): check the neighbour across that face."""
AMBIGUOUS_DIR = torch.from_numpy(_TABLES["ambiguous_dir"])
"""[256, 3] int64: outward direction of the flagged case's ambiguous face (zeros when not flagged)."""
QUAD_CYCLE = torch.from_numpy(_TABLES["quad_cycle"])
"""[3, 4] int64: edge slots j in counter-clockwise order around +axis (quad normal along +axis)."""


def edge_groups(case: int) -> list[list[int]]:
    """The dual vertices of `case` as lists of the crossed edges they join (readable view of EDGE_TO_DUAL)."""
    row = EDGE_TO_DUAL[case]
    return [[e for e in range(12) if int(row[e]) == v] for v in range(int(NUM_DUAL[case]))]


@lru_cache(maxsize=8)
def tables_on(device: torch.device) -> dict[str, torch.Tensor]:
    """The tables above as tensors on `device` (cached per device)."""
    return {
        "edge_corners": EDGE_CORNERS.to(device),
        "edge_to_dual": EDGE_TO_DUAL.to(device),
        "num_dual": NUM_DUAL.to(device),
        "ambiguous_flag": AMBIGUOUS_FLAG.to(device),
        "ambiguous_dir": AMBIGUOUS_DIR.to(device),
        "quad_cycle": QUAD_CYCLE.to(device),
    }
