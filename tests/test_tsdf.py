"""Corner TSDF: exact unsigned distance, winding-number sign (exact and Barnes-Hut), analytic sphere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from focusing.data.distance import TriangleGrid, point_triangle_distance, surface_distance
from focusing.data.grid import voxel_corners
from focusing.data.tsdf import corner_tsdf, winding_number
from focusing.data.voxelize import voxelize, with_batch
from focusing.data.winding import WindingTree, solid_angle
from focusing.io import Mesh, load_mesh, normalize


def icosphere(radius: float = 0.35, subdivisions: int = 4) -> tuple[Mesh, float]:
    """A closed, outward-oriented sphere mesh and its max deviation from the true sphere (inscribed)."""
    import trimesh

    s = trimesh.creation.icosphere(subdivisions, radius=radius)
    mesh = Mesh(s.vertices, s.faces)
    tri = mesh.vertices[mesh.faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    plane = np.abs(np.einsum("fc,fc->f", n / np.linalg.norm(n, axis=1, keepdims=True), tri[:, 0]))
    return mesh, radius - plane.min()


def hemisphere(radius: float = 0.4, rings: int = 12, segments: int = 48) -> Mesh:
    """Upper half of an outward-oriented UV sphere, open along the equator (whose vertices lie at z = 0)."""
    lat = np.linspace(0, np.pi / 2, rings + 1)[:-1]  # ring k at latitude lat[k]; the pole is added last
    lon = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    ring = np.stack([np.cos(lat)[:, None] * np.cos(lon), np.cos(lat)[:, None] * np.sin(lon)], -1)
    v = np.concatenate([ring, np.sin(lat)[:, None, None].repeat(segments, 1)], -1).reshape(-1, 3)
    v = np.concatenate([v, [[0, 0, 1]]]) * radius
    k, j = np.meshgrid(np.arange(rings - 1), np.arange(segments), indexing="ij")
    a, b = k * segments + j, k * segments + (j + 1) % segments
    quads = np.concatenate([np.stack([a, b, b + segments], -1), np.stack([a, b + segments, a + segments], -1)])
    pole = np.stack([a[-1] + segments, b[-1] + segments, np.full(segments, len(v) - 1)], -1)
    return Mesh(v, np.concatenate([quads.reshape(-1, 3), pole]))


def test_point_triangle_distance_matches_dense_sampling():
    rng = np.random.default_rng(0)
    tri = rng.normal(size=(200, 3, 3))
    tri[:20, 2] = tri[:20, 0] + 1e-9 * rng.normal(size=(20, 3))  # slivers
    p = rng.normal(size=(200, 3)) * 1.5
    exact = point_triangle_distance(torch.tensor(p), torch.tensor(tri)).numpy()
    m = 300  # barycentric lattice with spacing 1/m of each edge
    i, j = np.meshgrid(np.arange(m + 1), np.arange(m + 1), indexing="ij")
    keep = i + j <= m
    b = np.stack([i[keep], j[keep]], 1) / m  # [S, 2]
    pts = (
        tri[:, None, 0]
        + b[None, :, :1] * (tri[:, None, 1] - tri[:, None, 0])
        + b[None, :, 1:] * (tri[:, None, 2] - tri[:, None, 0])
    )
    sampled = np.linalg.norm(pts - p[:, None], axis=2).min(1)
    spacing = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(1) / m
    assert (exact <= sampled + 1e-12).all()  # a lattice point is never closer than the true distance
    assert (sampled - exact <= spacing).all()  # and the lattice is within one spacing of the closest point


def _brute_distance(mesh: Mesh, q: np.ndarray) -> torch.Tensor:
    tris = torch.tensor(mesh.vertices[mesh.faces])
    return torch.cat(
        [
            point_triangle_distance(torch.tensor(q[i : i + 64])[:, None], tris[None]).amin(1)
            for i in range(0, len(q), 64)
        ]
    )


@pytest.mark.parametrize("max_distance, resolution", [(0.05, None), (0.2, 16), (3 / 64, 64)])
def test_surface_distance_is_exact(data_dir, max_distance, resolution):
    mesh, _ = normalize(load_mesh(data_dir / "featuretype_block.ply"))  # CAD: large and small triangles
    rng = np.random.default_rng(1)
    q = np.concatenate([rng.uniform(-0.6, 0.6, (300, 3)), mesh.vertices[:200] + rng.normal(0, 0.01, (200, 3))])
    got = surface_distance(mesh, q, max_distance, resolution=resolution)
    expect = _brute_distance(mesh, q).clamp(max=max_distance)
    assert torch.allclose(got, expect, rtol=1e-12, atol=1e-15)  # exact up to the grid-unit scaling
    assert (expect < max_distance).sum() > 100  # not vacuous


def test_triangle_grid_corners_and_chunking(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "milk_truck.ply"))
    r = 32
    grid = TriangleGrid(mesh, r)
    corners = voxel_corners(with_batch(voxelize(mesh, r)))[0][::4, 1:]
    far = torch.tensor([[0, 0, 0], [r, r, r], [r // 2, 0, r]])  # grid corners possibly far from the surface
    g = torch.cat([corners, far]).double()
    expect = (_brute_distance(mesh, (g / r - 0.5).numpy()) * r).clamp(max=3.0)
    assert torch.allclose(grid.distance(g, 3.0), expect, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grid.distance(g, 3.0, budget=3000), expect, rtol=1e-12, atol=1e-12)
    assert (expect[: len(corners)] <= math.sqrt(3) + 1e-9).all()  # corners of active voxels: within a diagonal
    with pytest.raises(ValueError, match="normalised frame"):
        TriangleGrid(Mesh(mesh.vertices * 2, mesh.faces), r)


def test_winding_number_closed_sphere_exact_and_tree():
    mesh, sagitta = icosphere(0.35)
    rng = np.random.default_rng(3)
    p = rng.uniform(-0.5, 0.5, (1500, 3))
    r = np.linalg.norm(p, axis=1)
    clear = np.abs(r - 0.35) > sagitta  # between the polyhedron and the sphere the answer differs
    expect = (r < 0.35).astype(np.float64)
    exact = winding_number(mesh, p, method="exact").numpy()
    assert np.abs(exact - expect)[clear].max() < 1e-9
    tree = winding_number(mesh, p, method="tree").numpy()
    assert np.abs(tree - exact).max() < 0.06
    assert ((tree > 0.5) == (expect > 0.5))[clear].all()


def test_winding_number_sign_matches_trimesh_contains(data_dir):
    import trimesh

    mesh, _ = normalize(load_mesh(data_dir / "fertility.ply"))  # closed, genus 4
    rng = np.random.default_rng(4)
    p = rng.uniform(-0.5, 0.5, (3000, 3))
    far = surface_distance(mesh, p, 0.01).numpy() >= 0.01  # ray tests are unreliable right at the surface
    inside = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).contains(p)
    w = winding_number(mesh, p, method="tree").numpy()
    assert ((w > 0.5) == inside)[far].all()
    assert inside[far].sum() > 50  # the test is not vacuous


@pytest.mark.parametrize("name", ["fertility", "fandisk", "lilium_surface"])
def test_tree_error_against_exact(data_dir, name):
    mesh, _ = normalize(load_mesh(data_dir / f"{name}.ply"))
    rng = np.random.default_rng(5)
    v = mesh.vertices[rng.integers(0, len(mesh.vertices), 300)]
    p = np.concatenate([v + rng.normal(0, 0.01, v.shape), rng.uniform(-0.6, 0.6, (200, 3))])
    exact = winding_number(mesh, p, method="exact")
    tree = WindingTree(mesh, leaf_size=4)
    err2 = (tree(torch.tensor(p), beta=2.0) - exact).abs()
    err4 = (tree(torch.tensor(p), beta=4.0) - exact).abs()
    assert err2.max() < 0.05  # the documented bound for beta = 2 (module docstring)
    assert err4.max() < err2.max() and err4.mean() < 0.5 * err2.mean()  # opening more nodes converges


def test_winding_number_on_open_meshes():
    # Upper hemisphere of an outward sphere (open at z = 0): 1/2 at the centre of the rim's disc, between 1/2
    # and 1 above it inside the sphere, towards 0 far away, finite everywhere.
    hemi = hemisphere(0.4)
    n = np.cross(*(hemi.vertices[hemi.faces][:, 1:] - hemi.vertices[hemi.faces][:, :1]).transpose(1, 0, 2))
    assert (np.einsum("fc,fc->f", n, hemi.vertices[hemi.faces].mean(1)) > 0).all()  # outward
    z = np.linspace(0.0, 0.39, 5)
    axis = np.stack([np.zeros_like(z), np.zeros_like(z), z], 1)
    w = winding_number(hemi, axis, method="exact").numpy()
    assert abs(w[0] - 0.5) < 1e-12  # the polyhedral cap projects exactly onto the upper half of the sphere
    assert (np.diff(w) > 0).all() and w[-1] < 1.0
    assert abs(winding_number(hemi, [[0, 0, -100.0]], method="exact").item()) < 1e-3
    # On the surface itself (a vertex, an edge midpoint) the value is finite.
    on = np.stack([hemi.vertices[hemi.faces[0, 0]], hemi.vertices[hemi.faces[0, :2]].mean(0)])
    assert torch.isfinite(winding_number(hemi, on, method="exact")).all()


def test_winding_number_lilium_is_finite_and_bounded(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "lilium_surface.ply"))  # an open surface with a boundary
    rng = np.random.default_rng(6)
    p = np.concatenate([rng.uniform(-0.5, 0.5, (2000, 3)), mesh.vertices[:100]])
    w = winding_number(mesh, p, method="tree")
    assert torch.isfinite(w).all()
    assert w.min() > -0.6 and w.max() < 1.6  # an open sheet: |w| <= 1/2 away from it, jump of 1 across it


def test_solid_angle_of_a_face_seen_from_the_cube_centre():
    # Each face of a cube subtends 4 pi / 6 from the centre; two triangles per face.
    a = torch.tensor([[1.0, -1, -1], [1, 1, 1]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1, -1], [1, -1, 1]], dtype=torch.float64)
    c = torch.tensor([[1.0, 1, 1], [1, -1, -1]], dtype=torch.float64)
    assert torch.allclose(solid_angle(a, b, c).sum(), torch.tensor(4 * math.pi / 6, dtype=torch.float64))
    assert solid_angle(torch.zeros(3), b[0], c[0]).item() == 0.0  # viewpoint on a vertex: 0, not NaN


def test_corner_tsdf_matches_analytic_sphere():
    radius, r = 0.35, 32
    mesh, sagitta = icosphere(radius, 5)
    corners, _ = voxel_corners(with_batch(voxelize(mesh, r)))
    got = corner_tsdf(mesh, corners, r)  # [M, 4] accepted, batch ignored
    assert got.dtype == torch.float32 and got.shape == (len(corners),)
    t = 3.0 / r
    position = corners[:, 1:].double() / r - 0.5
    expect = (position.norm(dim=1) - radius).clamp(-t, t)
    assert (got.double() - expect).abs().max() <= sagitta + 1e-6  # polyhedron vs sphere, float32 storage
    assert got.abs().max() <= t + 1e-7
    # Every corner of an active voxel is within a voxel diagonal of the surface: inside the band.
    assert got.abs().max() <= math.sqrt(3) / r + 1e-6
    # Far corners are clamped, with the right sign.
    far = torch.tensor([[r // 2, r // 2, r // 2], [0, 0, 0]])
    assert torch.allclose(corner_tsdf(mesh, far, r), torch.tensor([-t, t]))


def test_corner_tsdf_open_mesh_is_finite(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "lilium_surface.ply"))
    corners, _ = voxel_corners(with_batch(voxelize(mesh, 32)))
    s = corner_tsdf(mesh, corners, 32, truncation_voxels=2.0)
    assert torch.isfinite(s).all() and s.abs().max() <= 2.0 / 32 + 1e-7
    assert (s < 0).any() and (s > 0).any()


@pytest.mark.gpu
def test_cuda_matches_cpu(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "fertility.ply"))
    r = 64
    corners = voxel_corners(with_batch(voxelize(mesh, r)))[0][:, 1:]
    grid_cpu, grid_gpu = TriangleGrid(mesh, r), TriangleGrid(mesh, r, device="cuda")
    g = corners.double()
    assert torch.allclose(grid_gpu.distance(g.cuda(), 3.0).cpu(), grid_cpu.distance(g, 3.0), rtol=0, atol=1e-12)
    p = g / r - 0.5
    w_cpu = WindingTree(mesh)(p)
    w_gpu = WindingTree(mesh, device="cuda")(p.cuda()).cpu()
    assert torch.allclose(w_gpu, w_cpu, rtol=0, atol=1e-9)
    assert torch.allclose(corner_tsdf(mesh, corners.cuda(), r).cpu(), corner_tsdf(mesh, corners, r), atol=1e-7)
