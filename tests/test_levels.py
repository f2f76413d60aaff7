"""Detail levels (`focusing.eval.levels`, `focusing levels`): the sharp-edge density is deterministic, ignores
units, position and the grid's orientation, orders synthetic shapes by their sharp edges; levels follow it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from focusing.cli import main
from focusing.eval import levels
from focusing.eval.levels import LEVEL_THRESHOLDS, level_of, mesh_level, sharp_edge_density, sharp_edges
from focusing.eval.watertight import offset_surface
from focusing.io import Mesh, normalize

R = 48
TILT = Rotation.from_euler("xyz", [23, 37, 11], degrees=True).as_matrix()


def _mesh(t: trimesh.Trimesh, rotation: np.ndarray = np.eye(3)) -> Mesh:
    return Mesh(np.asarray(t.vertices) @ rotation.T, t.faces)


def _gear(teeth: int = 24) -> Mesh:
    """A cylinder (radius 0.4, height 0.3) with `teeth` rectangular teeth around it: many sharp edges."""
    parts = [trimesh.creation.cylinder(radius=0.4, height=0.3, sections=96)]
    for k in range(teeth):
        tooth = trimesh.creation.box((0.12, 0.05, 0.3))
        tooth.apply_translation([0.44, 0.0, 0.0])
        tooth.apply_transform(trimesh.transformations.rotation_matrix(2 * np.pi * k / teeth, [0, 0, 1]))
        parts.append(tooth)
    return _mesh(trimesh.util.concatenate(parts))


@pytest.fixture(scope="module")
def densities() -> dict[str, float]:
    shapes = {
        "sphere": _mesh(trimesh.creation.icosphere(4)),
        "cube": _mesh(trimesh.creation.box((1, 1, 1))),
        "tilted cube": _mesh(trimesh.creation.box((1, 1, 1)), TILT),
        "gear": _gear(),
    }
    return {name: sharp_edge_density(mesh, R) for name, mesh in shapes.items()}


def test_sphere_cube_gear_are_ordered_and_the_sphere_is_near_zero(densities):
    assert densities["sphere"] < 0.05 * densities["cube"]
    assert densities["cube"] * 3 < densities["gear"]


def test_tilted_cube_scores_like_the_aligned_one_per_unit_edge_length(densities):
    # After normalising, a cube of side s has 12 s of edges on 6 s^2 of area: 2 / s per unit area.
    side = 1.0 / np.ptp(_mesh(trimesh.creation.box((1, 1, 1)), TILT).vertices, axis=0).max()
    per_edge_length = {"cube": densities["cube"] / 2.0, "tilted cube": densities["tilted cube"] * side / 2.0}
    assert 0.7 < per_edge_length["tilted cube"] / per_edge_length["cube"] < 1.4, per_edge_length


def test_tilted_slab_has_sharp_edges_only_along_its_edges():
    half = np.array([0.5, 0.5, 0.125])
    slab, norm = normalize(_mesh(trimesh.creation.box(2 * half), TILT))
    vertices, _, sharp = sharp_edges(offset_surface(slab, R))
    assert len(sharp)
    mid = norm.invert((vertices[sharp[:, 0]] + vertices[sharp[:, 1]]) / 2) @ TILT  # back in the slab's frame
    band = 3.5 / R / norm.scale  # three and a half voxels
    near_faces = (np.abs(mid) > half - band).sum(1)
    assert np.all(near_faces >= 2)  # every sharp edge lies near two faces at once: near an edge of the slab


def test_an_open_surface_is_sharp_only_at_its_rim():
    """Openness is not detail: a sphere with a cap cut off has sharp edges only where it ends."""
    s = trimesh.creation.icosphere(4)
    cut = 0.3
    open_sphere, norm = normalize(Mesh(s.vertices, s.faces[s.vertices[s.faces].mean(1)[:, 2] < cut]))
    vertices, _, sharp = sharp_edges(offset_surface(open_sphere, R))
    assert len(sharp)
    mid = norm.invert((vertices[sharp[:, 0]] + vertices[sharp[:, 1]]) / 2)
    assert np.all(np.abs(mid[:, 2] - cut) < 3.0 / R / norm.scale)  # within three voxels of the rim's plane


def test_deterministic_and_independent_of_units_and_position(data_dir):
    from focusing.io import load_mesh

    mesh = load_mesh(data_dir / "stone_tomb_01.glb")
    d = sharp_edge_density(mesh, R)
    assert sharp_edge_density(mesh, R) == d
    moved = mesh.transformed(lambda v: v * 37.5 + np.array([100.0, -3.0, 0.25]))
    assert sharp_edge_density(moved, R) == pytest.approx(d, rel=1e-6)


def test_levels_are_one_to_four_in_threshold_order():
    t = LEVEL_THRESHOLDS
    assert len(t) == 3 and t[0] < t[1] < t[2]
    assert [level_of(x) for x in (0.0, t[0] - 1e-9, t[0], t[1], t[2] - 1e-9, t[2], 1e9)] == [1, 1, 2, 3, 3, 4, 4]
    grid = np.linspace(0.0, 2 * t[2], 101)
    assert np.all(np.diff([level_of(x) for x in grid]) >= 0)


def test_mesh_level_is_the_level_of_its_density(monkeypatch):
    monkeypatch.setattr(levels, "LEVEL_RESOLUTION", 32)
    mesh = _mesh(trimesh.creation.box((1, 2, 3)))
    level, density = mesh_level(mesh)
    assert density == sharp_edge_density(mesh, 32) and level == level_of(density)


def test_command_reports_each_mesh_and_goes_on_after_a_bad_one(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(levels, "LEVEL_RESOLUTION", 32)
    folder = tmp_path / "meshes"
    folder.mkdir()
    for name in ("stone_tomb_01.glb", "corner_shelf_01.glb", "idler_riser.ply"):
        shutil.copy(data_dir / name, folder / name)
    (folder / "broken.ply").write_bytes(b"ply\nformat nonsense\n")
    out = tmp_path / "levels.json"
    assert main(["levels", str(folder), "--json", str(out), "--quartiles", "--quiet"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    rows = [line.split("\t") for line in lines[:-1]]
    assert [r[2] for r in rows] == ["meshes/corner_shelf_01.glb", "meshes/idler_riser.ply", "meshes/stone_tomb_01.glb"]
    assert all(r[0] == f"L{level_of(float(r[1]))}" for r in rows)
    assert lines[-1].startswith("count 3  failed 1  min ")
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and "broken.ply" in errors[0]
    body = json.loads(out.read_text())
    assert body["summary"]["count"] == 3 and [m["status"] for m in body["meshes"]].count("failed") == 1
    assert main(["levels", str(folder / "broken.ply"), "--quiet"]) == 1  # every mesh failed
    assert main(["levels", str(folder), "--strict", "--quiet"]) == 1
