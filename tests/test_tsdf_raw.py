"""The corner TSDF on raw meshes: independent of face winding, a zero crossing on open sheets, sub-voxel parts
and inner parts; the orientation repair it builds on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from focusing.data.grid import voxel_corners
from focusing.data.tsdf import corner_tsdf
from focusing.data.voxelize import voxelize, with_batch
from focusing.data.winding import orient_components
from focusing.eval import hard_cases as hc
from focusing.io import Mesh

R = 32


def _corners(mesh: Mesh, resolution: int = R, dilation: int = 0) -> torch.Tensor:
    from focusing.sparseflex.fit import dilate

    coords = dilate(with_batch(voxelize(mesh, resolution)), resolution, dilation)
    return voxel_corners(coords)[0][:, 1:]


def _volume(mesh: Mesh) -> float:
    tri = mesh.vertices[mesh.faces]
    return float(np.einsum("fc,fc->f", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6)


def _crossed_voxels(mesh: Mesh, resolution: int, s: torch.Tensor) -> float:
    """Share of the surface voxels whose 8 corners hold both signs as SparseFlex reads them (s < 0 inside, s >= 0
    outside): a zero crossing runs through them."""
    coords = with_batch(voxelize(mesh, resolution))
    corners, v2c = voxel_corners(coords)
    value = s[torch.searchsorted(_key(_corners(mesh, resolution)), _key(corners[:, 1:]))][v2c]
    return float(((value < 0).any(1) & (value >= 0).any(1)).double().mean())


def _key(c: torch.Tensor) -> torch.Tensor:
    c = c.long()
    return (c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]


@pytest.mark.parametrize("flip", [1.0, 0.3])
def test_orient_components_repairs_winding(flip):
    out, bad = hc.sphere(0.4, 3), hc.sphere(0.4, 3, flip_fraction=flip)
    assert _volume(bad) < 0.99 * _volume(out)  # the input really is broken
    fixed = orient_components(bad)
    assert np.array_equal(np.sort(fixed.faces, 1), np.sort(bad.faces, 1))  # the same triangles
    assert _volume(fixed) == pytest.approx(_volume(out), rel=1e-9)


def test_orient_components_per_component_and_open_sheets():
    parts = hc.assembly(12)
    fixed = orient_components(parts)
    tri = fixed.vertices[fixed.faces]
    vol = np.einsum("fc,fc->f", tri[:, 0], np.cross(tri[:, 1], tri[:, 2]))
    # Each box (12 faces, consecutive) is outward: positive volume about the origin, whatever its input winding.
    per_box = vol.reshape(-1, 12).sum(1)
    assert (per_box > 0).all()
    sheet = hc.wavy_sheet(17)
    flipped = Mesh(sheet.vertices, np.where((np.arange(len(sheet.faces)) % 3 == 0)[:, None],
                                            sheet.faces[:, ::-1], sheet.faces))
    n = np.cross(*(flipped.vertices[orient_components(flipped).faces][:, 1:] -
                   flipped.vertices[orient_components(flipped).faces][:, :1]).transpose(1, 0, 2))
    assert (n[:, 2] > 0).all() or (n[:, 2] < 0).all()  # one consistent side for the whole sheet


@pytest.mark.parametrize("flip", [0.0, 1.0, 0.3])
def test_sphere_sign_does_not_depend_on_winding(flip):
    mesh = hc.sphere(0.35, 4, flip_fraction=flip)
    corners = _corners(mesh)
    s = corner_tsdf(mesh, corners, R)
    expect = (corners.double() / R - 0.5).norm(dim=1) - 0.35
    sure = expect.abs() > 0.02 / R  # the polyhedron lies within the sagitta of the sphere
    assert torch.equal(s[sure] < 0, expect[sure] < 0)
    assert (s < 0).sum() > 1000


@pytest.mark.parametrize("make", [hc.flat_sheet, hc.wavy_sheet], ids=["flat", "wavy"])
def test_open_sheet_gets_a_zero_crossing_in_every_surface_voxel(make):
    mesh = make()  # spans (touches) its whole bounding box
    corners = _corners(mesh)
    s = corner_tsdf(mesh, corners, R)
    assert _crossed_voxels(mesh, R, s) > 0.97
    # Signed by side: corners above the sheet far from its rim share one sign, those below the other.
    inner = ((corners[:, :2] >= 3) & (corners[:, :2] <= R - 3)).all(1)
    z = corners[:, 2].double() / R - 0.5
    sheet_z = torch.from_numpy(_sheet_height(mesh, corners[:, :2].double() / R - 0.5))
    above, below = inner & (z > sheet_z + 0.3 / R), inner & (z < sheet_z - 0.3 / R)
    assert above.sum() > 100 and below.sum() > 100
    sa, sb = torch.sign(s[above]), torch.sign(s[below])
    assert (sa == sa[0]).all() and (sb == -sa[0]).all()


def _sheet_height(mesh: Mesh, xy: torch.Tensor) -> np.ndarray:
    """Height of a height-field sheet at xy [N, 2] (linear interpolation of its vertices: grid sheets only)."""
    from scipy.interpolate import LinearNDInterpolator

    return LinearNDInterpolator(mesh.vertices[:, :2], mesh.vertices[:, 2])(xy.numpy())


@pytest.mark.parametrize(
    "make", [lambda: hc.thin_plate(0.1 / R), lambda: hc.thin_rods(0.1 / R)], ids=["plate", "rod"]
)
def test_parts_thinner_than_a_voxel_become_a_thin_shell(make):
    mesh = make()
    corners = _corners(mesh)
    plain = corner_tsdf(mesh, corners, R, thin_shell=False)
    s = corner_tsdf(mesh, corners, R)
    assert _crossed_voxels(mesh, R, plain) < 0.5  # no corner lies inside a part a tenth of a voxel thick
    assert _crossed_voxels(mesh, R, s) > 0.9
    away = (corners[:, :2].double() / R - 0.5).abs().amax(1) > 0.1  # from the (thick) knob
    assert (s[away & (s < 0)] >= -0.1 / R - 1e-6).all()  # a shell hugging the part, not a solid


def test_thin_shell_leaves_thick_shapes_alone():
    mesh = hc.sphere(0.35, 3)
    corners = _corners(mesh, dilation=1)
    assert torch.equal(corner_tsdf(mesh, corners, R), corner_tsdf(mesh, corners, R, thin_shell=False))


def test_inner_parts_and_touching_parts():
    # An enclosure with a box inside: the inner box's surface gets a zero crossing (the classic w > 1/2 rule
    # has none there: w = 2 | 1). Two boxes glued face to face stay one solid: no crossing at the shared face.
    outer, inner = hc.box(-0.5, 0.5), hc.box(-0.2, 0.2)
    nested = hc._concat([outer, inner])
    corners = _corners(nested)
    s = corner_tsdf(nested, corners, R)
    g = corners.double() / R - 0.5
    near_inner = (g.abs().amax(1) - 0.2).abs() < 0.5 / R
    assert (s[near_inner & (g.abs().amax(1) < 0.2)] < 0).all() and (s[near_inner & (g.abs().amax(1) > 0.2)] > 0).all()
    glued = hc._concat([hc.box((-0.5, -0.25, -0.25), (0.0, 0.25, 0.25)), hc.box((0.0, -0.25, -0.25), (0.5, 0.25, 0.25))])
    c = _corners(glued)
    s = corner_tsdf(glued, c, R)
    g = c.double() / R - 0.5
    seam = (g[:, 0].abs() < 1.5 / R) & (g[:, 1:].abs().amax(1) < 0.2)
    assert seam.sum() > 20 and (s[seam & (s != 0)] < 0).all()  # corners on the shared face itself are 0


def test_many_part_assembly_every_part_has_a_surface():
    mesh = hc.assembly(50)
    s = corner_tsdf(mesh, _corners(mesh), R)
    assert _crossed_voxels(mesh, R, s) > 0.9
