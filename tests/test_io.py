"""Mesh I/O: every format round-trips, normalisation maps to the unit cube and back, bad files fail clearly."""

from __future__ import annotations

import os

import numpy as np
import pytest

from focusing.errors import InputError
from focusing.io import Mesh, load_mesh, normalize, save_mesh


def _tetra() -> Mesh:
    v = np.array([[0, 0, 0], [2, 0, 0], [0, 3, 0], [0, 0, 4]], dtype=np.float64) + 10.0
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    return Mesh(v, f)


def _same_triangles(a: Mesh, b: Mesh) -> bool:
    ta = np.sort(np.sort(a.vertices[a.faces].reshape(len(a.faces), -1), axis=1), axis=0)
    tb = np.sort(np.sort(b.vertices[b.faces].reshape(len(b.faces), -1), axis=1), axis=0)
    return ta.shape == tb.shape and np.allclose(ta, tb, atol=1e-5)


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".glb"])
def test_save_load_roundtrip(tmp_path, suffix):
    mesh = _tetra()
    path = save_mesh(mesh, tmp_path / f"t{suffix}")
    back = load_mesh(path)
    assert _same_triangles(mesh, back)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


@pytest.mark.parametrize("suffix", [".stl", ".off", ".gltf"])
def test_load_other_formats(tmp_path, suffix):
    import trimesh

    mesh = _tetra()
    path = tmp_path / f"t{suffix}"
    trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).export(str(path))
    assert _same_triangles(mesh, load_mesh(path))


def test_gltf_scene_transforms_applied(data_dir):
    import trimesh

    path = data_dir / "stone_tomb_01.glb"
    scene = trimesh.load(str(path), process=False)
    flat = scene.to_mesh()  # trimesh's own flattening, as an independent reference
    mesh = load_mesh(path)
    assert np.allclose(mesh.bounds, flat.bounds, atol=1e-6)
    assert abs(mesh.area() - flat.area) < 1e-6 * flat.area


def test_clean_drops_degenerate_and_unreferenced():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 5], [2, 0, 0]], dtype=float)
    f = np.array([[0, 1, 2], [0, 0, 1], [0, 1, 4]])  # repeated index; collinear (zero area)
    from focusing.io import clean

    m = clean(Mesh(v, f))
    assert len(m.faces) == 1 and len(m.vertices) == 3


def test_normalize_roundtrip(data_dir):
    mesh = load_mesh(data_dir / "fandisk.ply")
    norm_mesh, norm = normalize(mesh)
    lo, hi = norm_mesh.bounds
    assert np.isclose((hi - lo).max(), 1.0)
    assert np.allclose((hi + lo) / 2, 0.0, atol=1e-12)
    assert lo.min() >= -0.5 - 1e-12 and hi.max() <= 0.5 + 1e-12
    assert np.allclose(norm.invert(norm_mesh.vertices), mesh.vertices)
    h = np.c_[mesh.vertices, np.ones(len(mesh.vertices))] @ norm.matrix().T
    assert np.allclose(h[:, :3], norm_mesh.vertices)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty"),
        (b"this is not a mesh\n", "no triangle mesh"),
        (b"v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n", "NaN"),
        (b"v 0 0 0\nv 1 0 0\n", "no"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, content, problem):
    path = tmp_path / "bad.obj"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        load_mesh(path)
    assert str(path) in str(err.value)
    assert problem.lower() in str(err.value).lower()
    assert "\n" not in str(err.value)


def test_corrupt_binary_is_unreadable(tmp_path):
    path = tmp_path / "bad.ply"
    path.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1000\nproperty float x\nend_header\n\x00")
    with pytest.raises(InputError, match="unreadable"):
        load_mesh(path)


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "x.fbx").write_bytes(b"0")
    with pytest.raises(InputError, match="unsupported"):
        load_mesh(tmp_path / "x.fbx")
    with pytest.raises(InputError, match="no such file"):
        load_mesh(tmp_path / "missing.ply")


def test_atomic_writes_get_plain_file_permissions(tmp_path):
    from focusing.io import write_text_atomic

    mask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind
    finally:
        os.umask(mask)


def test_resolve_device():
    import torch

    from focusing.device import resolve_device

    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == auto
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")) == torch.device("cpu")
