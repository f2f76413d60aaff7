"""Detail levels L1-L4 of a mesh by its sharp-edge density (the grouping of the paper's Table 1, after Dora).

Procedure of `sharp_edge_density(mesh, R)` (R = `LEVEL_RESOLUTION` = 128 unless given):
1. Normalise the mesh into [-0.5, 0.5]^3 (`focusing.io.normalize`), so units and position do not matter.
2. Watertight remesh at R (`focusing.eval.watertight.watertight_remesh`: flood fill + marching cubes), so the
   raw file's tessellation (long slivers, split faces, inner parts, open sheets) does not count, only its shape.
3. Smooth the remesh with `SMOOTHING_STEPS` = 5 Taubin steps (uniform Laplacian, lambda 0.5, mu -0.53).
4. Vertex normals over 2-ring neighbourhoods: the sum of the (area-weighted) normals of the faces that touch the
   vertex or one of its neighbours, normalised.
5. A sharp edge is a mesh edge whose two end vertices' normals differ by more than `SHARP_ANGLE_DEG` = 15 deg.
6. Density = total length of the sharp edges / surface area of the smoothed remesh, in the normalised frame
   (unit 1 / length: about the length of sharp feature lines per unit area, times a band width of ~4 voxels).

Why steps 3-4 and the length in step 6 (measured at R = 128 on synthetic shapes, densities in this unit): the
flood-fill SDF jumps at the surface, so its marching cubes mesh is a staircase of voxel-sized bumps wherever the
surface is not aligned with the grid. Raw face dihedral angles are exact on an axis-aligned box (2.0 = its edge
length per area) but count the staircase everywhere else: sphere 181, the same box tilted off the grid 190.
Taubin smoothing removes the voxel-frequency bumps without shrinking the shape; normals over 2-rings average
out the remaining sliver triangles that marching cubes leaves near grid corners. Either alone is not enough (20
Taubin steps with face dihedrals: sphere 3.9 against box 6.0; 2-ring normals without smoothing: sphere 7.0
against box 9.7); together: sphere 0.42, box 8.2, tilted box 17.6 (after normalising its edges are 1.65x longer
per unit area, so 1.3x the aligned box per unit edge length), cylinder 14.5, 24-tooth gear 59. A real sharp
edge stays sharp: the normals still turn by its full angle, across a band of about two edges. Edges are weighted
by their length, not counted, because a feature line running diagonally to the grid is crossed by more, shorter
remesh edges than an axis-aligned one (counting gave the tilted box 1.6x the aligned one per unit edge length).
Whatever is thinner than a few voxels at R (wires, thin plates, the one-voxel shell that an open sheet becomes)
counts as sharp, and so, in part, do curves of radius below ~6 voxels (a sphere remeshed with a radius of 3, 4,
6, 8 voxels scores 13, 6.5, 2.3, 0): detail at the scale of the resolution.

`LEVEL_THRESHOLDS` split densities into L1 (fewest sharp edges) .. L4 (most). They are the quartiles of the
900 CC0 GLB meshes of ../shared/data/base-meshes, measured once (14 min 23 s with 2 worker processes on a shared
2-core CPU box, ~1 s of CPU per mesh; densities are bit-identical across processes and thread counts):

    focusing levels ../shared/data/base-meshes --workers 2 --quartiles --json corpus-levels.json
    count 900  failed 0  min 0.6636  q25 26.1351  median 45.7962  q75 100.9702  max 423.6946

(10th / 90th percentiles 14.2 / 194.7). Lowest: dice with bevelled edges, fruit, rocks, pills (0.7-2.1; a bevel
wider than ~2 voxels at R = 128 reads as smooth); highest: trellises, ladders, gratings, whisks, wire hangers,
rope (360-424). The 474 watertight meshes fall into L1-L4 as 186/129/103/56, the 426 open ones as 39/96/122/169
(thin sheets become one-voxel shells, which count as sharp). A coarsely faceted curved surface keeps its creases:
they are the file's geometry (tests/data/fertility.ply, 9000 faces, scores 26.9, next to fandisk.ply's 30.6).
"""

from __future__ import annotations

import bisect

import numpy as np
from scipy import sparse

from focusing.eval.watertight import watertight_remesh
from focusing.io.mesh import Mesh, normalize

LEVEL_RESOLUTION = 128
"""Resolution of the watertight remesh that densities are measured on (fixed: densities depend on it)."""
SHARP_ANGLE_DEG = 15.0
SMOOTHING_STEPS = 5
TAUBIN_LAMBDA, TAUBIN_MU = 0.5, -0.53

# The quartiles of the 900-mesh corpus ../shared/data/base-meshes (q25 26.1351, median 45.7962, q75 100.9702; see
# the module docstring), rounded to 2 decimals: 225 of its meshes in each level. Fixed: do not re-derive per dataset.
LEVEL_THRESHOLDS = (26.14, 45.80, 100.97)
"""Densities separating L1 | L2 | L3 | L4 (a density equal to a threshold belongs to the higher level)."""


def sharp_edge_density(mesh: Mesh, resolution: int = LEVEL_RESOLUTION) -> float:
    """Length of sharp edges per unit area of the smoothed watertight remesh at `resolution` (module docstring)."""
    normalized, _ = normalize(mesh)
    vertices, faces, sharp = sharp_edges(watertight_remesh(normalized, resolution))
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
