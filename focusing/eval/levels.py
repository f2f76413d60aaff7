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

Why steps 3-4 and the length in step 6 (measured at R = 128, densities in this unit): the flood-fill SDF jumps at
the surface, so its marching cubes mesh is a staircase of voxel-sized bumps; on flat faces tilted to the grid and
on curved ones, raw face dihedral angles above 15 deg are everywhere (a unit sphere scores like a gear and a
tilted box 25x its axis-aligned twin). Taubin smoothing removes the voxel-frequency bumps without shrinking the
shape; normals over 2-rings average out the remaining sliver triangles that marching cubes leaves near grid
corners. Either alone is not enough (20 Taubin steps with face dihedrals: sphere 4.0 against cube 6.0; 2-ring
normals without smoothing: sphere 7.0 against cube 8.2); together: sphere 0.4, box 8.2, a box tilted off the
grid 17.6 (its edges are 1.57x longer per unit area after normalising, so 1.4x per unit feature length),
cylinder 14.5, 24-tooth gear 59. A real sharp edge stays sharp: the normals still turn by its full angle across
a band of ~2 edges. Edges are weighted by their length, not counted, because a feature line running diagonally
to the grid is crossed by more, shorter remesh edges than an axis-aligned one (counting gave 1.75x for the
tilted box per unit feature length instead of 1.4x).

`LEVEL_THRESHOLDS` split densities into L1 (fewest sharp edges) .. L4 (most): see its comment for the corpus.
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

# PROVISIONAL (guessed from synthetic shapes: box ~8, cylinder ~15, gear ~59); to be replaced by the quartiles of
# the 900-mesh corpus at ../shared/data/base-meshes.
LEVEL_THRESHOLDS = (10.0, 20.0, 40.0)
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
