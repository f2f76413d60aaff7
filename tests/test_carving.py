"""Voxel carving (§3.2), frustum selection and adaptive zooming (§3.3): rendered-image equality with SparseFlex,
two-layer shapes, behind-camera voxels, zoom bounds and determinism, batch independence."""

import math

import numpy as np
import pytest
import torch
import trimesh

from focusing import carving
from focusing.data.grid import CORNER_OFFSETS, voxel_centers
from focusing.data.voxelize import voxelize, with_batch
from focusing.io import Mesh, load_mesh, normalize
from focusing.render import Camera, look_at, perspective, random_cameras, render_mesh
from focusing.sparse.lookup import occupancy
from focusing.sparseflex.extract import sparseflex_mesh
from focusing.sparseflex.fit import FitConfig, init_field

R_OUT = 64  # output (SparseFlex) resolution; the latent grid is R_OUT / 4
LATENT = R_OUT // 4
IMAGE = 128


def tensors(mesh: Mesh):
    return torch.as_tensor(mesh.vertices, dtype=torch.float32), torch.as_tensor(mesh.faces)


def camera_at(eye, target=(0.0, 0.0, 0.0), fov=40.0, near=0.1, far=10.0, size=IMAGE) -> Camera:
    view = look_at(torch.tensor([eye], dtype=torch.float32), torch.tensor([target], dtype=torch.float32))
    return Camera(view, perspective(fov, 1.0, near, far), size, size)


def dense_grid(res: int, batch: int = 0) -> torch.Tensor:
    g = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return with_batch(g, batch)


def cat_cameras(*cams: Camera) -> Camera:
    return Camera(torch.cat([c.view for c in cams]), torch.cat([c.proj for c in cams]), cams[0].height, cams[0].width)


# --- 1. the property that matters: the carved set decodes to the same image ---------------------------------

class Decoded:
    """A SparseFlex field (corner TSDF of a real mesh, undeformed, uniform weights) on output voxels at R_OUT;
    `render(latent_keep, camera)` decodes the output voxels whose latent parent (coords // 4) is kept."""

    def __init__(self, mesh: Mesh):
        field, _ = init_field(mesh, R_OUT, FitConfig(dilation=1), torch.device("cpu"))
        self.coords = field.coords
        self.sdf = (field.sdf.detach() / R_OUT)[field.voxel_to_corner]
        self.parent = torch.div(self.coords, torch.tensor([1, 4, 4, 4], dtype=torch.int32), rounding_mode="floor")
        self.latent = torch.unique(self.parent, dim=0)  # the decoder's latent voxels: parents of the output ones

    def render(self, latent_keep: torch.Tensor, camera: Camera):
        keep = occupancy(self.parent, self.latent[latent_keep])
        c, n = self.coords[keep], int(keep.sum())
        z = torch.zeros
        res = sparseflex_mesh(c, R_OUT, self.sdf[keep], z(n, 8, 3), z(n, 8), z(n, 12), z(n), training=False)
        return render_mesh(res.vertices, res.faces, camera, antialias=False)


def differing_pixels(a, b) -> torch.Tensor:
    """[B, H, W] bool: mask differs, or both covered and the depth differs."""
    ma, mb = a.tri_id >= 0, b.tri_id >= 0
    return (ma != mb) | (ma & mb & ((a.depth - b.depth).abs() > 1e-4))


@pytest.fixture(scope="module")
def block(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "idler_riser.ply"))  # CAD part: large faces seen at grazing angles
    cams = random_cameras(4, resolution=IMAGE, generator=torch.Generator().manual_seed(1))
    return mesh, Decoded(mesh), cams, carving.gt_depth_for_carving(*tensors(mesh), cams)


@pytest.mark.parametrize("mode,zoom", [("carve", False), ("carve", True), ("frustum", True)])
def test_carved_set_renders_like_everything(block, mode, zoom):
    mesh, dec, cams, depth = block
    everything = torch.ones(len(dec.latent), dtype=torch.bool)
    total_diff = total_fg = 0
    for i in range(len(cams)):
        sel = carving.select_voxels(dec.latent, LATENT, cams[i], mode=mode, zoom=zoom, depth_map=depth[i : i + 1],
                                    r=2 / R_OUT, n_range=(60, 120), generator=torch.Generator().manual_seed(i))
        assert sel.stats["n_zoom"] == int(sel.keep.sum()) < len(dec.latent)
        full = dec.render(everything, sel.camera)
        part = dec.render(sel.keep, sel.camera)
        total_diff += int(differing_pixels(full, part).sum())
        total_fg += int((full.tri_id >= 0).sum())
        if zoom:
            assert (sel.camera.proj != cams[i].proj).any()
            assert (full.tri_id >= 0).float().mean() > 0.2  # the zoomed view is filled by the object
    # misses can only come from surfaces seen through gaps narrower than a latent voxel; none in these views
    assert total_diff <= 0.01 * total_fg
    if mode == "carve" and not zoom:  # the same count is large when carving is weakened
        weak = {"centre only (paper)": dict(corners=False), "centre only, no dilation": dict(corners=False,
                                                                                          dilate=False)}
        for label, kw in weak.items():
            lost = sum(int(differing_pixels(dec.render(everything, cams[i]), dec.render(
                carving.carve(dec.latent, LATENT, cams[i], depth[i : i + 1], 2 / R_OUT, **kw), cams[i])).sum())
                for i in range(len(cams)))
            assert lost > 0.05 * total_fg, label


def hollow_ball(outer=0.45, inner=0.25) -> Mesh:
    """A thick spherical shell: outer sphere facing out, inner one facing in (the hidden cavity wall)."""
    a, b = trimesh.creation.icosphere(3, radius=outer), trimesh.creation.icosphere(3, radius=inner)
    faces = np.concatenate([a.faces, b.faces[:, ::-1] + len(a.vertices)])
    return Mesh(np.concatenate([a.vertices, b.vertices]), faces)


def test_carving_removes_hidden_structure():
    mesh = hollow_ball()
    coords = with_batch(voxelize(mesh, LATENT))
    radius = (voxel_centers(coords, LATENT)).norm(dim=1)
    cams = random_cameras(3, resolution=IMAGE, generator=torch.Generator().manual_seed(3))
    depth = carving.gt_depth_for_carving(*tensors(mesh), cams)
    for i in range(3):
        keep = carving.carve(coords, LATENT, cams[i], depth[i : i + 1], 2 / R_OUT)
        assert not keep[radius < 0.3].any()  # the cavity wall is never visible
        assert keep.sum() < 0.6 * len(coords)  # the far side of the outer sphere and the whole cavity go


# --- 2. two-layer shape: the far layer is dropped, every voxel of the visible one kept -----------------------

def plates(z=(0.27, -0.27), half=0.3) -> Mesh:
    """Two squares parallel to the xy-plane (off the grid planes, so each fills one voxel layer)."""
    quad = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    verts = np.concatenate([np.c_[quad, np.full(4, zi)] for zi in z])
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    return Mesh(verts, faces)


def test_carving_keeps_visible_layer_drops_far_layer():
    mesh = plates()
    coords = with_batch(voxelize(mesh, LATENT))
    z = voxel_centers(coords, LATENT)[:, 2]
    cam = camera_at((0.0, 0.0, 2.0))  # looking down -z at the plate z = +0.27
    depth = carving.gt_depth_for_carving(*tensors(mesh), cam)
    assert torch.isinf(depth[0, 0, 0]) and torch.isfinite(depth[0, IMAGE // 2, IMAGE // 2])
    for dilate in (False, True):
        keep = carving.carve(coords, LATENT, cam, depth, 2 / R_OUT, dilate=dilate)
        assert keep[z > 0].all() and not keep[z < 0].any()
    # seen from below, it is the other way round
    below = camera_at((0.0, 0.0, -2.0))
    keep = carving.carve(coords, LATENT, below, carving.gt_depth_for_carving(*tensors(mesh), below), 2 / R_OUT)
    assert keep[z < 0].all() and not keep[z > 0].any()
    # the tolerance r, on the layers behind the visible one (z = 0.27 lies 0.32 / R_OUT behind the front corners
    # of its voxel layer): centre test, layer 1 back has its centre 3.3 / R_OUT behind the surface
    front = coords[z > 0]
    back = [front - torch.tensor([0, 0, 0, k], dtype=torch.int32) for k in (1, 2)]
    layers = torch.cat([front, *back])
    n = len(front)
    keep = carving.carve(layers, LATENT, cam, depth, 2 / R_OUT, dilate=False, corners=False)
    assert keep[:n].all() and not keep[n:].any()
    keep = carving.carve(layers, LATENT, cam, depth, 5 / R_OUT, dilate=False, corners=False)
    assert keep[: 2 * n].all() and not keep[2 * n :].any()
    # corner test: layer 1 back has its front corners 1.3 / R_OUT behind the surface (kept), layer 2 5.3
    # (dropped, except at the rim, where outer corners see the background beside the plate's silhouette)
    keep = carving.carve(layers, LATENT, cam, depth, 2 / R_OUT, dilate=False)
    rim = (voxel_centers(layers, LATENT)[:, :2].abs() > 0.25).any(1)
    assert keep[: 2 * n].all() and not keep[2 * n :][~rim[2 * n :]].any() and keep[2 * n :][rim[2 * n :]].any()


# --- 3. behind the camera -------------------------------------------------------------------------------------

def test_behind_camera_voxels_are_dropped():
    coords = dense_grid(LATENT)
    centres = voxel_centers(coords, LATENT)
    half_diagonal = math.sqrt(3) / (2 * LATENT)
    cam = camera_at((0.0, 0.0, 0.0), target=(1.0, 0.0, 0.0), fov=60.0, near=0.1)  # inside the grid, looking +x
    background = torch.full((1, IMAGE, IMAGE), math.inf)
    ndc, depth = carving.project_centers(coords, LATENT, cam)
    assert torch.allclose(depth, centres[:, 0])  # depth along +x
    mirrored = (depth < 0) & (ndc[:, :2].abs() <= 1).all(1)  # behind, but x/w, y/w fall inside the image
    assert mirrored.sum() > 100
    keep = carving.carve(coords, LATENT, cam, background, 2 / R_OUT, dilate=False, corners=False)
    assert keep.any() and (depth[keep] > 0.1).all()
    keep = carving.carve(coords, LATENT, cam, background, 2 / R_OUT, dilate=False)  # a corner in front suffices
    assert keep.any() and (depth[keep] > 0.1 - half_diagonal).all() and not keep[mirrored].any()
    keep = carving.carve(coords, LATENT, cam, background, 2 / R_OUT)
    assert (depth[keep] > 0.1 - half_diagonal - 1 / LATENT).all()  # dilation reaches one voxel further back
    inside = carving.frustum(coords, LATENT, cam)
    assert inside.any() and (depth[inside] > 0.1 - half_diagonal).all()
    # looking away from the object: nothing is selected
    away = camera_at((2.0, 0.0, 0.0), target=(4.0, 0.0, 0.0))
    assert not carving.carve(coords, LATENT, away, background, 2 / R_OUT).any()
    assert not carving.frustum(coords, LATENT, away).any()


def test_frustum_keeps_every_cube_that_meets_it_and_honours_near_far():
    coords = dense_grid(LATENT)
    cam = camera_at((0.3, 0.9, 1.2), target=(0.1, 0.0, 0.0), fov=30.0)
    keep = carving.frustum(coords, LATENT, cam, near=1.0, far=1.6)
    # 5^3 points per voxel: a voxel with a point inside the frustum must be kept
    t = (torch.arange(5) / 4.0 - 0.5) / LATENT
    offsets = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)
    pts = voxel_centers(coords, LATENT)[:, None] + offsets  # [N, 125, 3]
    ndc, depth = cam.project(pts.reshape(-1, 3))
    inside = ((ndc[0, :, :2].abs() <= 1).all(1) & (depth[0] >= 1.0) & (depth[0] <= 1.6)).reshape(len(coords), -1)
    touched = inside.any(1)
    assert touched.sum() > 50 and keep[touched].all()
    # the conservative extra ones (bounding sphere) sit next to a touched voxel
    extra = coords[keep & ~touched]
    near_touched = carving.dilate_within(coords, LATENT, touched)
    assert occupancy(extra, coords[near_touched]).all()
    assert keep.sum() < 2 * touched.sum()
    # the camera's own planes (near 0.1, far 10) contain the whole grid from this distance
    assert carving.frustum(coords, LATENT, cam).sum() > keep.sum()


# --- 4. adaptive zooming ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fandisk64(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "fandisk.ply"))
    res = 64
    coords = with_batch(voxelize(mesh, res))
    cams = random_cameras(4, resolution=IMAGE, generator=torch.Generator().manual_seed(5))
    depth = carving.gt_depth_for_carving(*tensors(mesh), cams)
    return coords, res, cams, depth


def test_zoom_window_contains_the_chosen_voxels(fandisk64):
    coords, res, cams, depth = fandisk64
    for i in range(len(cams)):
        keep = carving.carve(coords, res, cams[i], depth[i : i + 1], 0.5 / res)
        sub = coords[keep]
        ndc, d = carving.project_centers(sub, res, cams[i])
        for centre, n in [(0, 300), (len(sub) // 2, 500), (len(sub) - 1, 50)]:
            bbox, chosen = carving.zoom_window(sub, res, cams[i], centre, n)
            assert len(chosen) == n and centre in chosen.tolist()
            zoomed = cams[i].zoomed(bbox[None])
            # every corner of every chosen voxel projects inside the zoomed image (the pad covers the cubes)
            corners = (sub[chosen, None, 1:] + CORNER_OFFSETS).reshape(-1, 3).float() / res - 0.5
            cndc, _ = zoomed.project(corners)
            assert (cndc[0, :, :2].abs() <= 1 + 1e-4).all()
            # square in NDC (no stretch), the window never leaves the original view, and it is tight
            half = (bbox[1] - bbox[0]) / 2
            assert torch.isclose(half, (bbox[3] - bbox[2]) / 2)
            window = torch.stack([bbox[:2].mean(), bbox[2:].mean()])
            assert ((window.abs() + half / 1.1) <= 1 + 1e-5).all()
            farthest = (ndc[chosen, :2] - window).abs().amax()
            assert half / 1.1 <= farthest + 3 * math.sqrt(3) / res * cams[i].proj[0, 0, 0] / d[chosen].min()


def test_adaptive_zoom_bounds_and_determinism(fandisk64):
    coords, res, cams, depth = fandisk64
    n_range = (300, 600)
    for i in range(len(cams)):
        keep = carving.carve(coords, res, cams[i], depth[i : i + 1], 0.5 / res)
        (cam, crop), (again, crop2), (_, crop3) = [
            carving.adaptive_zoom(coords, res, cams[i], keep, n_range, generator=torch.Generator().manual_seed(seed))
            for seed in (7, 7, 8)]
        assert torch.equal(cam.proj, again.proj) and torch.equal(crop, crop2)
        assert not torch.equal(crop, crop3)
        assert torch.equal(cam.view, cams[i].view) and not torch.equal(cam.proj, cams[i].proj)
        # the crop set: every kept voxel seen through the zoomed camera, dilated within the latent voxels
        seen = keep & carving.visible_in_image(coords, res, cam)
        assert torch.equal(crop, carving.dilate_within(coords, res, seen))
        # KNN set + square box + pad, then one dilation shell: between n_min and ~2x n_max at this size
        assert n_range[0] <= int(crop.sum()) <= 2.5 * n_range[1] < keep.sum()
    # an item with <= n_min kept voxels is not zoomed
    few = torch.zeros(len(coords), dtype=torch.bool)
    few[:300] = True
    cam, crop = carving.adaptive_zoom(coords, res, cams[0], few, n_range, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cam.proj, cams[0].proj) and torch.equal(crop, few)


# --- 5. batches -----------------------------------------------------------------------------------------------

def test_batch_items_are_independent(fandisk64):
    coords, res, cams, depth = fandisk64
    two = torch.cat([coords, coords[::2].clone()])
    two[len(coords):, 0] = 1
    first, second = two[:, 0] == 0, two[:, 0] == 1
    cam2 = cat_cameras(cams[0], cams[1])
    d2 = depth[:2]
    alone = [(coords, cams[0], depth[:1]), (two[second].clone(), cams[1], depth[1:2])]
    alone[1][0][:, 0] = 0
    batch_keep = carving.carve(two, res, cam2, d2, 0.5 / res)
    batch_frustum = carving.frustum(two, res, cam2, near=1.5, far=2.2)
    for mask, (c, cam, d) in zip([first, second], alone):
        assert torch.equal(batch_keep[mask], carving.carve(c, res, cam, d, 0.5 / res))
        assert torch.equal(batch_frustum[mask], carving.frustum(c, res, cam, near=1.5, far=2.2))
        ndc, dep = carving.project_centers(c, res, cam)
        bndc, bdep = carving.project_centers(two[mask], res, cam2)
        assert torch.allclose(ndc, bndc) and torch.allclose(dep, bdep)

    def zoom(c, cam, d):
        return carving.select_voxels(c, res, cam, mode="carve", zoom=True, depth_map=d, r=0.5 / res,
                                     n_range=(200, 400), generator=torch.Generator().manual_seed(3))

    sel = zoom(two, cam2, d2)
    first_alone = zoom(*alone[0])
    assert torch.equal(sel.keep[first], first_alone.keep) and torch.equal(sel.camera.proj[:1], first_alone.camera.proj)
    # item 1's zoom depends on its own voxels and camera only: changing item 0 leaves it unchanged
    swapped = zoom(two, cat_cameras(cams[2], cams[1]), torch.cat([depth[2:3], depth[1:2]]))
    assert torch.equal(sel.keep[second], swapped.keep[second])
    assert torch.equal(sel.camera.proj[1], swapped.camera.proj[1])
    assert not torch.equal(sel.keep[first], swapped.keep[first])
    assert sel.stats["zoomed_items"] == 2 and sel.stats["n_zoom"] == int(sel.keep.sum())


# --- select_voxels --------------------------------------------------------------------------------------------

def test_select_voxels_modes_and_stats(fandisk64):
    coords, res, cams, depth = fandisk64
    cam, d = cams[1], depth[1:2]
    kw = dict(depth_map=d, r=0.5 / res, n_range=(300, 600))
    none = carving.select_voxels(coords, res, cam, mode="none", zoom=False)
    assert none.keep.all() and none.camera is cam and none.stats == {"n_latent": len(coords), "n_mode": len(coords),
                                                                     "n_zoom": len(coords)}
    carved = carving.select_voxels(coords, res, cam, mode="carve", zoom=False, **kw)
    assert torch.equal(carved.keep, carving.carve(coords, res, cam, d, 0.5 / res))
    assert carved.stats["n_mode"] == carved.stats["n_carve"] == int(carved.keep.sum()) < len(coords)
    zoomed = {m: carving.select_voxels(coords, res, cam, mode=m, zoom=True, generator=torch.Generator().manual_seed(1),
                                       **kw) for m in carving.MODES}
    # one generator state: the three zoomed modes see the same pixels
    assert all(torch.equal(z.camera.proj, zoomed["carve"].camera.proj) for z in zoomed.values())
    assert zoomed["none"].keep.all()
    assert torch.equal(zoomed["frustum"].keep, carving.frustum(coords, res, zoomed["frustum"].camera))
    assert zoomed["carve"].stats["n_zoom"] < zoomed["frustum"].stats["n_zoom"] < zoomed["frustum"].stats["n_mode"]
    with pytest.raises(ValueError, match="depth_map"):
        carving.select_voxels(coords, res, cam, mode="carve", zoom=False)
    with pytest.raises(ValueError, match="depth_map"):
        carving.select_voxels(coords, res, cam, mode="frustum", zoom=True, n_range=(1, 2))
    with pytest.raises(ValueError, match="mode"):
        carving.select_voxels(coords, res, cam, mode="visible", zoom=False)
    with pytest.raises(ValueError, match="cameras"):
        carving.carve(with_batch(coords[:, 1:], 1), res, cam, d, 0.5 / res)


def test_dilate_within_stays_in_coords_and_batch_item():
    coords = torch.cat([dense_grid(6), dense_grid(6, batch=1)])
    keep = torch.zeros(len(coords), dtype=torch.bool)
    keep[(coords == torch.tensor([0, 2, 3, 3], dtype=torch.int32)).all(1)] = True
    keep[(coords == torch.tensor([0, 0, 0, 5], dtype=torch.int32)).all(1)] = True  # a grid corner: 8 neighbours
    grown = carving.dilate_within(coords, 6, keep)
    assert int(grown.sum()) == 27 + 8 and not grown[coords[:, 0] == 1].any()
    assert ((coords[grown, 1:] - torch.tensor([2, 3, 3])).abs().amax(1) <= 1).sum() == 27
    sparse = coords[::3]  # neighbours that are not in `coords` are not invented
    grown = carving.dilate_within(sparse, 6, (sparse == torch.tensor([0, 2, 3, 3], dtype=torch.int32)).all(1))
    assert 1 < int(grown.sum()) < 27 and ((sparse[grown, 1:] - torch.tensor([2, 3, 3])).abs().amax(1) <= 1).all()


@pytest.mark.parametrize("radius", [1, 2])
def test_dilate_within_matches_brute_force(radius):
    g = torch.Generator().manual_seed(radius)
    coords = torch.unique(torch.cat([torch.randint(0, 2, (400, 1), generator=g),
                                     torch.randint(0, 10, (400, 3), generator=g)], 1).int(), dim=0)
    keep = torch.rand(len(coords), generator=g) < 0.1
    same_item = coords[:, None, 0] == coords[None, keep, 0]
    near = (coords[:, None, 1:] - coords[None, keep, 1:]).abs().amax(-1) <= radius
    expected = keep | (same_item & near).any(1)
    assert torch.equal(carving.dilate_within(coords, 10, keep, radius), expected)
    assert torch.equal(carving.dilate_within(coords, 10, torch.zeros_like(keep), radius), torch.zeros_like(keep))
