"""Synthetic raw meshes that break naive pipelines: wrong winding, open sheets, sub-voxel parts, many parts.

Each maker returns a `Mesh` in the normalised frame [-0.5, 0.5]^3 (longest side 1, as `focusing.io.normalize`
leaves it); `hard_cases()` names them for the benchmark (benchmarks/bench_hard_cases.py) and the tests.
"""

from __future__ import annotations

import numpy as np

from focusing.io.mesh import Mesh, normalize


def _grid_sheet(n: int, height) -> Mesh:
    """Height field z = height(x, y) over [-0.5, 0.5]^2 on an n x n vertex grid, 2 (n - 1)^2 triangles."""
    u = np.linspace(-0.5, 0.5, n)
    x, y = np.meshgrid(u, u, indexing="ij")
    vertices = np.stack([x, y, height(x, y)], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    a = (i * n + j).reshape(-1)
    faces = np.concatenate([np.stack([a, a + n, a + 1], 1), np.stack([a + 1, a + n, a + n + 1], 1)])
    return Mesh(vertices, faces)


def sphere(radius: float = 0.5, subdivisions: int = 4, flip_fraction: float = 0.0, seed: int = 0) -> Mesh:
    """Icosphere; flip_fraction = 1 winds every face inward, 0 < f < 1 flips a random share of the faces."""
    import trimesh

    s = trimesh.creation.icosphere(subdivisions, radius=radius)
    faces = np.asarray(s.faces).copy()
    flip = np.random.default_rng(seed).random(len(faces)) < flip_fraction if flip_fraction < 1 else slice(None)
    faces[flip] = faces[flip][:, ::-1]
    return Mesh(np.asarray(s.vertices, dtype=np.float64), faces)


def flat_sheet(n: int = 33, z: float = 0.013) -> Mesh:
    """An open square sheet spanning its whole bounding box (one component, a boundary all around)."""
    return _grid_sheet(n, lambda x, y: np.full_like(x, z))


def wavy_sheet(n: int = 65, amplitude: float = 0.08, waves: float = 2.0) -> Mesh:
    """An open height field z = a sin(2 pi k x) cos(2 pi k y), touching its bounding box on every side."""
    return _grid_sheet(n, lambda x, y: amplitude * np.sin(2 * np.pi * waves * x) * np.cos(2 * np.pi * waves * y))


def box(lo, hi) -> Mesh:
    """Closed axis-aligned box [lo, hi] (3-vectors), 12 outward triangles."""
    lo, hi = np.broadcast_to(np.asarray(lo, float), 3), np.broadcast_to(np.asarray(hi, float), 3)
    corner = np.array([[(hi if (k >> a) & 1 else lo)[a] for a in range(3)] for k in range(8)])
    quads = [(0, 2, 3, 1), (4, 5, 7, 6), (0, 1, 5, 4), (2, 6, 7, 3), (0, 4, 6, 2), (1, 3, 7, 5)]
    return Mesh(corner, np.array([f for a, b, c, d in quads for f in ((a, b, c), (a, c, d))]))


def _concat(parts: list[Mesh]) -> Mesh:
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    return Mesh(
        np.concatenate([p.vertices for p in parts]), np.concatenate([p.faces + o for p, o in zip(parts, offsets)])
    )


def _knob() -> Mesh:
    """A small cube above the thin parts: it moves their bounding box's centre, so that after normalising they
    lie off the grid planes of every R = 2^k (and of R = 24) instead of on the plane z = 0."""
    return box((-0.025, -0.025, 0.05), (0.025, 0.025, 0.1))


def thin_plate(thickness: float) -> Mesh:
    """A closed square plate [-0.5, 0.5]^2 x [-t/2, t/2], e.g. thinner than a voxel, with a knob (normalised)."""
    return normalize(_concat([box((-0.5, -0.5, -thickness / 2), (0.5, 0.5, thickness / 2)), _knob()]))[0]


def thin_rods(thickness: float, count: int = 3) -> Mesh:
    """`count` closed square rods of side `thickness` along x, spread over y (spider legs, wires), with a knob
    (normalised)."""
    ys = np.linspace(-0.3, 0.3, count)
    ys[1:-1] += 0.013  # off the centre plane
    h = thickness / 2
    return normalize(_concat([box((-0.5, y - h, -h), (0.5, y + h, h)) for y in ys] + [_knob()]))[0]


def assembly(parts: int = 50, seed: int = 0) -> Mesh:
    """`parts` closed boxes of random sizes (some below a voxel at R = 64) and windings, some touching or nested."""
    rng = np.random.default_rng(seed)
    meshes = []
    for k in range(parts):
        centre = rng.uniform(-0.4, 0.4, 3)
        half = rng.uniform(0.004, 0.08, 3)
        part = box(centre - half, centre + half)
        meshes.append(Mesh(part.vertices, part.faces[:, ::-1]) if k % 3 == 0 else part)
    meshes.append(box(-0.5, 0.5))  # an enclosure: every other part is an inner part
    return normalize(_concat(meshes))[0]


def hard_cases() -> dict[str, Mesh]:
    """The synthetic hard cases of the benchmark, by name (normalised)."""
    cases = {
        "sphere_inward": sphere(flip_fraction=1.0),
        "sphere_flip30": sphere(flip_fraction=0.3),
        "sheet_flat": flat_sheet(),
        "sheet_wavy": wavy_sheet(),
        "plate_thin": thin_plate(0.002),
        "rods_thin": thin_rods(0.002),
        "assembly_50": assembly(50),
        "box_grid_planes": box(-0.5, 0.5),
    }
    return {name: normalize(mesh)[0] for name, mesh in cases.items()}
