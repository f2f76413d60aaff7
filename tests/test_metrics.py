"""Chamfer / F-score: sampling floor on a self-resample, the expected growth for a known offset."""

from __future__ import annotations

import numpy as np
import pytest

from focusing.data.sampling import sample_surface
from focusing.eval.metrics import surface_metrics
from focusing.io import Mesh, load_mesh


def icosphere(radius: float = 0.5, subdivisions: int = 5) -> Mesh:
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return Mesh(np.asarray(s.vertices), np.asarray(s.faces))


def test_self_resample_is_at_sampling_floor(data_dir):
    mesh = load_mesh(data_dir / "fandisk.ply")
    m = surface_metrics(mesh, mesh)
    assert 0.3e-5 < m.chamfer < 2.0e-5
    assert m.fscore > 0.95
    assert m.normal_consistency > 0.97


def test_concentric_spheres_offset():
    # Concentric spheres of radii r and r + e: NN distances are ~e (plus the sampling floor), so CD grows as
    # 2 e^2 over the floor, and F drops from its floor to 0 once e exceeds the threshold.
    gt = icosphere(0.5)
    floor = surface_metrics(gt, gt, n_samples=50_000, normalize=False)
    near = surface_metrics(icosphere(0.501), gt, n_samples=50_000, normalize=False)
    assert near.fscore > floor.fscore - 0.05
    for e in (0.01, 0.02):
        m = surface_metrics(icosphere(0.5 + e), gt, n_samples=50_000, normalize=False)
        assert m.chamfer == pytest.approx(2 * e * e + floor.chamfer, rel=0.1)
        assert m.fscore < 0.01


def test_pred_is_judged_in_gt_frame():
    gt = icosphere(0.5)
    big = gt.transformed(lambda v: v * 3.0 + 7.0)  # same shape, other units: must not be normalised on its own
    assert surface_metrics(big, gt).fscore < 0.01
    assert surface_metrics(gt.transformed(lambda v: v * 3.0 + 7.0), big).fscore > 0.85


def test_sampling_deterministic_and_on_faces(data_dir):
    mesh = load_mesh(data_dir / "fertility.ply")
    a = sample_surface(mesh, 20_000, seed=3)
    b = sample_surface(mesh, 20_000, seed=3)
    assert np.array_equal(a.points, b.points)
    assert not np.array_equal(a.points, sample_surface(mesh, 20_000, seed=4).points)
    assert np.allclose(np.linalg.norm(a.normals, axis=1), 1.0, atol=1e-5)
    tri = mesh.vertices[mesh.faces[a.face_index]]
    # each point lies in its face's plane (normal . (p - v0) = 0) and inside the triangle (barycentrics >= 0)
    assert np.abs(np.sum((a.points - tri[:, 0]) * a.normals, axis=1)).max() < 1e-4 * np.ptp(mesh.vertices)
    e0, e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 1], tri[:, 0] - tri[:, 2]
    n = np.cross(e0, tri[:, 2] - tri[:, 0])
    for e, v in [(e0, tri[:, 0]), (e1, tri[:, 1]), (e2, tri[:, 2])]:
        assert (np.sum(np.cross(e, a.points - v) * n, axis=1) >= -1e-9 * np.abs(n).max()).all()


def test_area_weighting():
    # two triangles, areas 1 and 3: samples split 1:3
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [5, 0, 0], [8, 0, 0], [5, 2, 0]], dtype=float)
    m = Mesh(v, np.array([[0, 1, 2], [3, 4, 5]]))
    s = sample_surface(m, 40_000, seed=0)
    assert np.mean(s.face_index == 1) == pytest.approx(0.75, abs=0.01)


def test_sampling_normals_follow_face_orientation_and_are_uniform():
    import trimesh

    s = trimesh.creation.icosphere(3)
    outward = Mesh(s.vertices, s.faces)
    a = sample_surface(outward, 5_000, seed=0)
    assert (np.sum(a.points * a.normals, axis=1) > 0).all()  # outward faces, outward normals
    b = sample_surface(Mesh(s.vertices, s.faces[:, ::-1]), 5_000, seed=0)
    assert (np.sum(b.points * b.normals, axis=1) < 0).all()  # flipped winding flips the normals
    # Uniform within a triangle: the corner sub-triangle x + y < 1/2 holds a quarter of the area.
    unit = Mesh(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=float), np.array([[0, 1, 2]]))
    p = sample_surface(unit, 100_000, seed=1).points
    assert np.mean(p[:, 0] + p[:, 1] < 0.5) == pytest.approx(0.25, abs=0.005)
    assert np.allclose(p[:, :2].mean(0), 1 / 3, atol=0.003)
