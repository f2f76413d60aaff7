"""Exact voxelisation: equals a naive exact-rational all-voxels x all-triangles reference, half-open cubes, covers
every surface point, and the pyramid levels equal independent voxelisations (consistent parents)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from focusing.data.sampling import sample_surface
from focusing.data.voxelize import coarsen, triangle_box_overlap, voxel_pyramid, voxelize, with_batch
from focusing.io import Mesh, load_mesh, normalize

def _clip(poly: list, axis: int, bound: Fraction, keep_below: bool) -> list:
    """Sutherland-Hodgman: the part of a convex polygon (list of 3-tuples of Fractions) with x_axis <= bound
    (keep_below) or >= bound, exactly."""
    inside = (lambda p: p[axis] <= bound) if keep_below else (lambda p: p[axis] >= bound)
    out = []
    for a, b in zip(poly, poly[1:] + poly[:1]):
        if inside(a):
            out.append(a)
        if inside(a) != inside(b):
            t = (bound - a[axis]) / (b[axis] - a[axis])
            out.append(tuple(a[c] + t * (b[c] - a[c]) for c in range(3)))
    return out


def naive_voxelize(mesh: Mesh, resolution: int) -> np.ndarray:
    """Reference in exact rational arithmetic, independent of the SAT: every voxel of the grid against every
    triangle. The triangle is clipped to the closed cube; the (convex) piece meets the half-open cube unless it
    lies entirely in one of its open upper faces (a convex set inside a union of planes lies in one of them)."""
    tri = (mesh.vertices[mesh.faces] + 0.5) * resolution  # [F, 3, 3] grid units
    hit = set()
    for t in tri:
        poly = [tuple(Fraction(float(c)) for c in v) for v in t]
        lo = np.clip(np.floor(t.min(0)).astype(int) - 1, 0, resolution - 1)
        hi = np.clip(np.floor(t.max(0)).astype(int) + 1, 0, resolution - 1)
        for voxel in itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)]):
            piece = poly
            for axis, i in enumerate(voxel):
                piece = _clip(_clip(piece, axis, Fraction(i), False), axis, Fraction(i + 1), True) if piece else []
            if not piece:
                continue
            on_open_face = any(
                i < resolution - 1 and all(p[axis] == i + 1 for p in piece) for axis, i in enumerate(voxel)
            )
            if not on_open_face:
                hit.add(voxel)
    out = np.array(sorted(hit), dtype=np.int64).reshape(-1, 3)
    return out


def random_triangles(seed: int, n: int = 25) -> Mesh:
    """Large and small random triangles plus slivers: needles, near-collinear and exactly collinear ones."""
    rng = np.random.default_rng(seed)
    big = rng.uniform(-0.55, 0.55, (n, 3, 3))  # some poke out of the grid
    small = rng.uniform(-0.5, 0.5, (n, 1, 3)) + rng.normal(0, 0.03, (n, 3, 3))
    a, b = rng.uniform(-0.5, 0.5, (2, n, 3))
    t = rng.uniform(0, 1, (n, 1))
    collinear = np.stack([a, b, a + t * (b - a)], 1)
    sliver = collinear + np.concatenate([np.zeros((n, 2, 3)), rng.normal(0, 1e-7, (n, 1, 3))], 1)
    tris = np.concatenate([big, small, collinear, sliver])
    return Mesh(tris.reshape(-1, 3), np.arange(3 * len(tris)).reshape(-1, 3))


def lattice_triangles(seed: int, resolution: int, n: int = 30) -> Mesh:
    """Triangles whose vertices lie on the half-voxel lattice: faces in grid planes, edges on grid lines,
    vertices on grid corners and on the outer faces, i.e. every kind of tie the half-open rule must break."""
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 2 * resolution + 1, (n, 3, 3)) / 2.0
    flat = rng.integers(0, 3, n)  # a third of them flattened into a grid plane
    v[np.arange(n) % 3 == 0, :, flat[np.arange(n) % 3 == 0]] = rng.integers(0, resolution + 1, (n + 2) // 3)[:, None]
    small = v[:, :1] + rng.integers(-2, 3, (n, 3, 3)) / 2.0  # small ones too
    tris = np.clip(np.concatenate([v, small]), 0, resolution) / resolution - 0.5
    return Mesh(tris.reshape(-1, 3), np.arange(6 * n).reshape(-1, 3))


@pytest.mark.parametrize("resolution, seed", [(4, 0), (8, 1)])
def test_matches_naive_reference_on_lattice_triangles(resolution, seed):
    mesh = lattice_triangles(seed, resolution)
    assert np.array_equal(voxelize(mesh, resolution).numpy(), naive_voxelize(mesh, resolution))
    assert torch.equal(voxelize(mesh, resolution, chunk=32), voxelize(mesh, resolution))


@pytest.mark.parametrize("resolution, seed", [(8, 0), (13, 1)])
def test_matches_naive_reference_on_random_triangles(resolution, seed):
    mesh = random_triangles(seed, n=12)
    expect = naive_voxelize(mesh, resolution)
    got = voxelize(mesh, resolution)
    assert got.dtype == torch.int32 and got.shape[1] == 3
    assert np.array_equal(got.numpy(), expect)  # sorted lexicographically like the reference
    # Tiny chunks exercise the chunking and every level of the coarse-to-fine refinement.
    assert torch.equal(voxelize(mesh, resolution, chunk=64), got)


def _grid_mesh(resolution: int, tris_grid: list) -> Mesh:
    """A mesh from triangles given in grid units (exact binary fractions)."""
    v = np.asarray(tris_grid, dtype=np.float64).reshape(-1, 3) / resolution - 0.5
    return Mesh(v, np.arange(len(v)).reshape(-1, 3))


def _as_set(coords: torch.Tensor) -> set:
    return {tuple(c) for c in coords.tolist()}


def test_half_open_cube_semantics_on_grid_planes():
    r = 16
    # A triangle lying in the grid plane x = 3: only the voxels x = 3 (the plane is their closed lower face). In
    # the plane it is {y, z >= 4.5, y + z <= 10}; its hypotenuse touches the cell (y, z) = (5, 5) at its lower
    # corner, which belongs to it.
    tri = _grid_mesh(r, [[(3, 4.5, 4.5), (3, 5.5, 4.5), (3, 4.5, 5.5)]])
    in_plane = voxelize(tri, r)
    assert _as_set(in_plane) == {(3, y, z) for y in (4, 5) for z in (4, 5)}
    assert np.array_equal(in_plane.numpy(), naive_voxelize(tri, r))
    # A triangle in the plane x = y with an edge on the grid line x = y = 4: one of the 4 voxels around it.
    edge = voxelize(_grid_mesh(r, [[(4, 4, 2.5), (4, 4, 3.5), (4.2, 4.2, 3)]]), r)
    assert _as_set(edge) == {(4, 4, z) for z in (2, 3)}
    # A vertex on the grid corner (6, 6, 6), the rest inside voxel (6, 6, 6): that voxel only.
    corner = voxelize(_grid_mesh(r, [[(6, 6, 6), (6.5, 6.2, 6.3), (6.2, 6.5, 6.4)]]), r)
    assert _as_set(corner) == {(6, 6, 6)}
    # Touching a voxel's open upper face from above activates the voxel above only.
    above = voxelize(_grid_mesh(r, [[(1.2, 1.2, 5), (1.8, 1.2, 5.5), (1.2, 1.8, 5.5)]]), r)
    assert _as_set(above) == {(1, 1, 5)}
    # On the grid's outer face x = R (x = +0.5): the voxels x = R - 1, closed there.
    outer = voxelize(_grid_mesh(r, [[(r, 1.5, 1.5), (r, 2.5, 1.5), (r, 1.5, 2.5)]]), r)
    assert _as_set(outer) == {(r - 1, y, z) for y in (1, 2) for z in (1, 2)}


def _box(lo: float, hi: float) -> Mesh:
    """Axis-aligned box [lo, hi]^3 (normalised frame), 12 triangles."""
    v = np.array(list(itertools.product([lo, hi], repeat=3)), dtype=np.float64)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return Mesh(v, np.array([f for a, b, c, d in quads for f in ((a, b, c), (a, c, d))]))


@pytest.mark.parametrize("lo, hi", [(-0.25, 0.25), (-0.5, 0.5), (-0.3125, 0.125)])
def test_box_on_grid_planes_every_voxel_holds_sample_points(lo, hi):
    # Faces on grid planes: each face activates exactly one layer of voxels, the one its sample points fall in
    # by the encoder's rule floor((p + 0.5) R) clamped to [0, R - 1], computed in float32 like the encoder. The
    # only voxels without points are those the box meets along a line: its 3 upper edges inside the grid.
    r = 32
    mesh = _box(lo, hi)
    coords = _as_set(voxelize(mesh, r))
    points = torch.from_numpy(sample_surface(mesh, 100_000, seed=0).points)
    cells = _as_set(torch.unique(torch.floor((points + 0.5) * r).clamp_(0, r - 1).to(torch.int32), dim=0))
    side = round((hi - lo) * r)
    assert cells <= coords
    assert len(coords - cells) == (0 if hi == 0.5 else 3 * side + 1)
    assert len(coords - cells) < 0.04 * len(coords)
    side = round((hi - lo) * r)
    # The voxels [L, H]^3 of the box's planes L, H minus the interior, or [0, R - 1]^3 minus it for the full grid.
    expect = side**3 - (side - 2) ** 3 if hi == 0.5 else (side + 1) ** 3 - (side - 1) ** 3
    assert len(coords) == expect  # closed cubes: 2 layers per face


def test_triangle_box_overlap_touching_counts():
    # A cube [-1/2, 1/2]^3 and triangles that touch it at a face, an edge, a corner, or miss by a hair.
    tri = torch.tensor(
        [
            [[0.5, -0.2, -0.2], [0.5, 0.2, -0.2], [0.5, 0.0, 0.3]],  # lies on the face x = 1/2
            [[0.5, 0.5, -0.2], [0.9, 0.9, 0.0], [0.5, 0.5, 0.2]],  # edge on the cube edge x = y = 1/2
            [[0.5, 0.5, 0.5], [1.0, 0.6, 0.7], [0.6, 1.0, 0.8]],  # vertex on the cube corner
            [[0.5 + 1e-12, -0.2, -0.2], [0.6, 0.2, -0.2], [0.6, 0.0, 0.3]],  # misses by 1e-12
            [[1.2, 0.0, 0.0], [0.0, 1.2, 0.0], [0.0, 0.0, 1.2]],  # plane x + y + z = 1.2 misses the corner (1.5)
            [[1.6, 0.0, 0.0], [0.0, 1.6, 0.0], [0.0, 0.0, 1.6]],  # x + y + z = 1.6: beyond the corner's 1.5
        ],
        dtype=torch.float64,
    )
    assert triangle_box_overlap(tri, 0.5).tolist() == [True, True, True, False, True, False]


def test_giant_triangle_matches_closed_form():
    # A right triangle in the plane z = z0 spanning almost the whole grid: starts at a coarse block level
    # and is refined down. Cell (i, j) is hit iff the smallest feasible point (max(i, a), max(j, a)) of the
    # closed square lies in {x >= a, y >= a, x + y <= b}.
    r = 256
    a, b, z0 = 0.05 * r, 1.9 * r, 100.3
    got = voxelize(_grid_mesh(r, [[(a, a, z0), (b - a, a, z0), (a, b - a, z0)]]), r)
    i, j = np.meshgrid(np.arange(r), np.arange(r), indexing="ij")
    x, y = np.maximum(i, a), np.maximum(j, a)
    hit = (x <= i + 1) & (y <= j + 1) & (x + y <= b)
    expect = np.stack([i[hit], j[hit], np.full(hit.sum(), int(z0))], 1)
    assert np.array_equal(got.numpy(), expect[np.lexsort(expect.T[::-1])])


@pytest.mark.parametrize("name, resolution", [("fandisk", 64), ("lilium_surface", 128), ("steel_ladder", 128)])
def test_every_surface_point_lies_in_an_active_voxel(data_dir, name, resolution):
    mesh, _ = normalize(load_mesh(data_dir / f"{name}.ply"))
    coords = voxelize(mesh, resolution)
    active = np.zeros((resolution,) * 3, dtype=bool)
    active[tuple(coords.long().T)] = True
    rng = np.random.default_rng(0)
    face = rng.integers(0, len(mesh.faces), 200_000)
    bary = rng.dirichlet(np.ones(3), len(face))
    points = np.einsum("nk,nkc->nc", bary, mesh.vertices[mesh.faces[face]])  # float64, on the triangles
    cell = np.clip(np.floor((points + 0.5) * resolution).astype(np.int64), 0, resolution - 1)
    assert active[tuple(cell.T)].all()
    # And not bloated: a thin shell around the surface, a few voxels per sampled cell at most.
    assert len(coords) < 4 * len(np.unique(cell, axis=0))


@pytest.mark.parametrize("name", ["fandisk", "milk_truck", "lilium_surface"])
def test_pyramid_levels_are_exact_and_consistent(data_dir, name):
    mesh, _ = normalize(load_mesh(data_dir / f"{name}.ply"))
    r = 64
    pyramid = voxel_pyramid(mesh, r)
    assert sorted(pyramid) == [r // 4, r // 2, r]
    # Coarsening an exact voxelisation equals the exact voxelisation of the coarser grid (half-open cubes).
    assert torch.equal(pyramid[r // 2], voxelize(mesh, r // 2))
    assert torch.equal(pyramid[r // 4], voxelize(mesh, r // 4))
    for fine, coarse in ((r, r // 2), (r // 2, r // 4)):
        f, c = pyramid[fine], pyramid[coarse]
        assert f.dtype == torch.int32
        assert _as_set(f // 2) == _as_set(c)  # every parent present, every coarse voxel has a child
        keys = (f[:, 0].long() * fine + f[:, 1]) * fine + f[:, 2]
        assert bool((keys[1:] > keys[:-1]).all())  # sorted, unique


def test_pyramid_on_random_triangles_and_helpers():
    mesh = random_triangles(3, n=20)
    pyramid = voxel_pyramid(mesh, 16)
    assert np.array_equal(pyramid[8].numpy(), naive_voxelize(mesh, 8))
    assert np.array_equal(pyramid[4].numpy(), naive_voxelize(mesh, 4))
    assert torch.equal(coarsen(pyramid[16], 4), pyramid[4])
    with pytest.raises(ValueError):
        voxel_pyramid(mesh, 30)
    b = with_batch(pyramid[4], 3)
    assert b.shape == (len(pyramid[4]), 4) and b.dtype == torch.int32 and bool((b[:, 0] == 3).all())


def test_mesh_outside_the_grid_is_empty():
    v = np.array([[2.0, 2, 2], [3, 2, 2], [2, 3, 2]])
    out = voxelize(Mesh(v, [[0, 1, 2]]), 8)
    assert out.shape == (0, 3) and out.dtype == torch.int32


@pytest.mark.gpu
def test_cuda_matches_cpu(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "fandisk.ply"))
    assert torch.equal(voxelize(mesh, 128, device="cuda").cpu(), voxelize(mesh, 128))
