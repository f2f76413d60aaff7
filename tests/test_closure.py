"""Hole closing (focusing.sparseflex.closure): open rings, small components, filling pinholes, not fronts."""

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from focusing.data.grid import CORNER_OFFSETS
from focusing.sparseflex.closure import close_holes, hole_voxels, open_ring_voxels, small_components
from focusing.sparseflex.extract import sparseflex_mesh

R = 16


def _sheet(lo=2, hi=14, z=7):
    """A wavy sheet crossing the voxel layer `z`: all voxels (0, x, y, z) for lo <= x, y < hi, and their corner
    SDFs (normalised units) of the height field z = 7.5 + 0.2 sin(0.7 x + 0.3 y) (voxel units)."""
    xy = torch.cartesian_prod(torch.arange(lo, hi), torch.arange(lo, hi))
    coords = torch.cat([torch.zeros(len(xy), 1, dtype=torch.int64), xy, torch.full((len(xy), 1), z)], 1).int()
    corner = coords[:, None, 1:].double() + CORNER_OFFSETS.double()  # [N, 8, 3]
    height = 7.5 + 0.2 * torch.sin(0.7 * corner[..., 0] + 0.3 * corner[..., 1])
    return coords, (corner[..., 2] - height) / R


def _mesh(coords, sdf, deform=None):
    n = len(coords)
    deform = torch.zeros(n, 8, 3, dtype=sdf.dtype) if deform is None else deform
    res = sparseflex_mesh(coords, R, sdf, deform, torch.zeros(n, 8, dtype=sdf.dtype), torch.zeros(n, 12, dtype=sdf.dtype),
                          torch.zeros(n, dtype=sdf.dtype), training=False)
    return res.vertices, res.faces


def _boundary_edges(faces):
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
    _, count = torch.unique(e, dim=0, return_counts=True)
    return int((count == 1).sum())


def _rows(coords, voxels):
    return [int(((coords == torch.tensor(v, dtype=torch.int32)).all(1)).nonzero()) for v in voxels]


def test_open_rings_are_the_missing_voxels_and_the_rim():
    coords, sdf = _sheet()
    hole = _rows(coords, [(0, 7, 8, 7)])
    keep = torch.ones(len(coords), dtype=torch.bool)
    keep[hole] = False
    absent = open_ring_voxels(coords[keep], sdf[keep])
    assert (absent == torch.tensor([0, 7, 8, 7], dtype=torch.int32)).all(1).sum() == 1
    rim = absent[(absent[:, 1:3] < 2).any(1) | (absent[:, 1:3] >= 14).any(1)]
    assert len(rim) == len(absent) - 1  # everything else lies just outside the sheet
    assert (rim[:, 3] == 7).all()
    # the complete sheet: only the rim
    assert len(open_ring_voxels(coords, sdf)) == len(rim)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_components_match_scipy(seed):
    g = torch.Generator().manual_seed(seed)
    xyz = torch.unique(torch.randint(0, 12, (300, 3), generator=g), dim=0)
    coords = torch.cat([torch.randint(0, 2, (len(xyz), 1), generator=g), xyz], 1).int()
    coords = torch.unique(coords, dim=0)
    n = len(coords)
    diff = (coords[:, None, :] - coords[None, :, :]).abs()
    adjacent = (diff[..., 0] == 0) & (diff[..., 1:].max(-1).values <= 1)
    _, label = connected_components(coo_matrix(adjacent.numpy().astype(np.int8)), directed=False)
    size = np.bincount(label)[label]
    for k in (1, 2, 3, 5, 8):
        assert torch.equal(small_components(coords, k), torch.from_numpy(size <= k)), k


def test_pinholes_are_filled_and_the_old_surface_kept():
    coords, sdf = _sheet()
    full_vertices, full_faces = _mesh(coords, sdf)
    rim = _boundary_edges(full_faces)
    holes = _rows(coords, [(0, 5, 5, 7), (0, 10, 9, 7), (0, 11, 9, 7)])  # a 1-voxel and a 2-voxel hole
    keep = torch.ones(len(coords), dtype=torch.bool)
    keep[holes] = False
    open_vertices, open_faces = _mesh(coords[keep], sdf[keep])
    assert _boundary_edges(open_faces) > rim
    assert len(hole_voxels(coords[keep], sdf[keep])) == 3
    # the candidates' own predictions are off (never trained); closing must not let them move the surface
    noisy = sdf.clone()
    noisy[holes] += 0.3 / R * torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=sdf.dtype)
    deform = torch.zeros(len(coords), 8, 3, dtype=sdf.dtype)
    deform[holes] = 0.5
    closed, sdf2, deform2 = close_holes(coords, noisy, deform, keep, ~keep)
    assert closed.all()
    vertices, faces = _mesh(coords, sdf2, deform2)
    assert _boundary_edges(faces) == rim and len(faces) == len(full_faces)
    assert torch.allclose(vertices, full_vertices, atol=1e-12)  # all 8 corners of each hole voxel were shared
    assert torch.equal(sdf2[keep], noisy[keep]) and torch.equal(deform2[keep], deform[keep])
    old = {tuple(v) for v in open_vertices.numpy().round(12).tolist()}
    assert old <= {tuple(v) for v in vertices.numpy().round(12).tolist()}


def test_fronts_and_non_candidates_stay_open():
    coords, sdf = _sheet()
    cut = (coords[:, 1] == 8) & (coords[:, 2] >= 2)  # a slit across the whole sheet: a long component
    pin = torch.tensor(_rows(coords, [(0, 4, 4, 7)]))
    keep = ~cut
    keep[pin] = False
    assert len(hole_voxels(coords[keep], sdf[keep])) == 1
    closed, _, _ = close_holes(coords, sdf, torch.zeros(len(coords), 8, 3, dtype=sdf.dtype), keep, ~keep)
    assert torch.equal(closed, ~cut)  # the pinhole filled, the slit left open
    not_candidate = ~keep
    not_candidate[pin] = False
    closed, _, _ = close_holes(coords, sdf, torch.zeros(len(coords), 8, 3, dtype=sdf.dtype), keep, not_candidate)
    assert torch.equal(closed, keep)
