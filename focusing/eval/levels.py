"""Detail levels L1-L4 of a mesh by its sharp-edge density (the grouping of the paper's Table 1, after Dora).

Procedure of `sharp_edge_density(mesh, R)` (R = `LEVEL_RESOLUTION` = 128 unless given):
1. Normalise the mesh into [-0.5, 0.5]^3 (`focusing.io.normalize`), so units and position do not matter.
2. Watertight remesh at R: the closed surface one voxel away from the mesh (`focusing.eval.watertight.
   offset_surface`, marching cubes on exact unsigned distances), so the raw file's tessellation (long slivers,
   split faces, holes, open sheets, duplicated layers) does not count, only its shape.
3. Smooth the remesh with `SMOOTHING_STEPS` = 5 Taubin steps (uniform Laplacian, lambda 0.5, mu -0.53).
4. Vertex normals over 2-ring neighbourhoods: the sum of the (area-weighted) normals of the faces that touch the
   vertex or one of its neighbours, normalised.
5. A sharp edge is a mesh edge whose two end vertices' normals differ by more than `SHARP_ANGLE_DEG` = 15 deg.
6. Density = total length of the sharp edges / surface area of the smoothed remesh, in the normalised frame
   (unit 1 / length: about the length of sharp feature lines per unit area, times a band width of a few voxels).

Why the offset surface (step 2): the flood-fill SDF route (`watertight_remesh`) turns every open sheet and
every mesh with a hole into a one-voxel shell whose marching-cubes surface is bumpy all over, so open meshes
scored as sharp everywhere: the bunny (open at its base) 300, lilium_surface 282, a face scan 307, all above
the sharpest CAD parts (gear_ring 141). The offset surface is smooth on both sides of a sheet and only rounds
convex edges (radius one voxel; concave creases and the inner offset's edges stay sharp): bunny 18.4, lilium
15.8, face scan 13.7, spot_cow 6.4, fandisk 33.3, airplane_holes 94, gear_ring 141, sword 169. An open
boundary counts as an edge (the surface turns 180 degrees around it).

Why steps 3-4 and the length in step 6 (R = 128, synthetic shapes): marching cubes leaves sliver triangles near
grid corners whose face normals are noisy; Taubin smoothing removes voxel-frequency bumps without shrinking and
2-ring normals average the slivers out. Sphere 0.0, box 14.8 (aligned with the grid), the same box tilted 18.8
(its edges are 1.65x longer per unit area after normalising, so 0.8x the aligned box per unit edge length),
cylinder 14.6, 24-tooth gear 82. Edges are weighted by their length, not counted, because a feature line
running diagonally to the grid is crossed by more, shorter remesh edges than an axis-aligned one. Whatever is
thinner than a few voxels at R (wires, thin plates) and curves of radius below a few voxels count as sharp:
detail at the scale of the resolution.

`LEVEL_THRESHOLDS` split densities into L1 (fewest sharp edges) .. L4 (most). They are the quartiles of the
900 CC0 GLB meshes of ../shared/data/base-meshes, measured once (26 min 38 s with 2 worker processes on a
2-core CPU box shared with other jobs, ~1-2 s of CPU per mesh):

    focusing levels ../shared/data/base-meshes --workers 2 --quartiles --json corpus-levels.json
    count 900  failed 0  min 0.0000  q25 25.2259  median 46.9123  q75 89.5756  max 332.8175

(10th / 90th percentiles 13.6 / 154.7). Lowest: dice with bevelled edges, pills, capsules, fruit, rings, rocks
(0-0.4; a bevel wider than ~2 voxels at R = 128 reads as smooth); highest: garden obelisks, clothes hangers,
rugby goals, arches, tent pegs, trellises, cycle racks (290-333: wires and thin bars). The 474 watertight meshes
fall into L1-L4 as 176/118/108/72, the 426 open ones as 50/106/117/153: the corpus's open meshes are mostly thin
objects (signs, plates, gratings), whose parts thinner than a few voxels count as sharp. (The earlier flood-fill
measure gave 186/129/103/56 and 39/96/122/169, and scored the open real meshes above as sharp all over.)
"""

from __future__ import annotations

import bisect

import numpy as np
from scipy import sparse

from focusing.eval.watertight import offset_surface
from focusing.io.mesh import Mesh, normalize

LEVEL_RESOLUTION = 128
"""Resolution of the offset-surface remesh that densities are measured on (fixed: densities depend on it)."""
SHARP_ANGLE_DEG = 15.0
SMOOTHING_STEPS = 5
TAUBIN_LAMBDA, TAUBIN_MU = 0.5, -0.53
LEVEL_MEASURE = f"offset-surface R={LEVEL_RESOLUTION} taubin={SMOOTHING_STEPS} ring=2 angle={SHARP_ANGLE_DEG:g}"
"""Names the density's definition: densities stored under another name are stale (`focusing benchmark` redoes them)."""

# The quartiles of the 900-mesh corpus ../shared/data/base-meshes (q25 25.2259, median 46.9123, q75 89.5756; see
# the module docstring), rounded to 2 decimals: 225 of its meshes in each level. Fixed: do not re-derive per dataset.
LEVEL_THRESHOLDS = (25.23, 46.91, 89.58)
"""Densities separating L1 | L2 | L3 | L4 (a density equal to a threshold belongs to the higher level)."""


def sharp_edge_density(mesh: Mesh, resolution: int = LEVEL_RESOLUTION) -> float:
    """Length of sharp edges per unit area of the smoothed offset surface at `resolution` (module docstring)."""
    normalized, _ = normalize(mesh)
    vertices, faces, sharp = sharp_edges(offset_surface(normalized, resolution))
    length = np.linalg.norm(vertices[sharp[:, 0]] - vertices[sharp[:, 1]], axis=1).sum()
    return float(length / Mesh(vertices, faces).area())


def sharp_edges(remesh: Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 3-5 on a remesh: smoothed vertices [V, 3], faces [F, 3] and the sharp edges [S, 2] (vertex pairs)."""
    faces = remesh.faces
    vertices = taubin_smooth(remesh.vertices, faces, SMOOTHING_STEPS)
    normals = ring_normals(vertices, faces)
    edges = unique_edges(faces)
    cos = np.einsum("ij,ij->i", normals[edges[:, 0]], normals[edges[:, 1]])
    return vertices, faces, edges[cos < np.cos(np.radians(SHARP_ANGLE_DEG))]


def level_of(density: float) -> int:
    """Detail level 1..4 of a sharp-edge density (`LEVEL_THRESHOLDS`)."""
    return 1 + bisect.bisect_right(LEVEL_THRESHOLDS, density)


def mesh_level(mesh: Mesh) -> tuple[int, float]:
    """(level 1..4, sharp-edge density) of a mesh in any units."""
    density = sharp_edge_density(mesh, LEVEL_RESOLUTION)
    return level_of(density), density


def unique_edges(faces: np.ndarray) -> np.ndarray:
    """[E, 2] int64 undirected edges of faces [F, 3], each once, lower index first, sorted."""
    e = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    n = int(faces.max()) + 1
    key = np.unique(e[:, 0] * n + e[:, 1])
    return np.stack([key // n, key % n], axis=1)


def _adjacency(faces: np.ndarray, n: int) -> sparse.csr_matrix:
    """[n, n] 0/1 vertex adjacency (symmetric, no diagonal)."""
    e = unique_edges(faces)
    rows, cols = np.concatenate([e[:, 0], e[:, 1]]), np.concatenate([e[:, 1], e[:, 0]])
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, steps: int) -> np.ndarray:
    """[V, 3] vertices after `steps` Taubin steps (uniform Laplacian, lambda then mu): low-pass, no shrinking."""
    adjacency = _adjacency(faces, len(vertices))
    mean = sparse.diags(1.0 / np.maximum(adjacency.sum(1).A1, 1.0)) @ adjacency
    v = vertices
    for _ in range(steps):
        v = v + TAUBIN_LAMBDA * (mean @ v - v)
        v = v + TAUBIN_MU * (mean @ v - v)
    return v


def ring_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[V, 3] unit normals: area-weighted sum of the normals of the faces touching a vertex or its neighbours."""
    n = len(vertices)
    incidence = sparse.csr_matrix(
        (np.ones(faces.size), (faces.reshape(-1), np.repeat(np.arange(len(faces)), 3))), shape=(n, len(faces))
    )
    reach = ((_adjacency(faces, n) + sparse.identity(n, format="csr")) @ incidence) > 0  # faces within 2 rings
    normals = reach.astype(np.float64) @ Mesh(vertices, faces).face_cross()
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-300)
