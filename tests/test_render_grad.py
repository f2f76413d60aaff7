"""Gradients: interpolation (depth, normal) and antialiased silhouettes against finite differences."""

import numpy as np
import pytest
import torch
import trimesh

from focusing.render import Camera, look_at, perspective, random_cameras, render_mesh
from focusing.render.antialias import mesh_topology
from focusing.render.interpolate import interpolate
from focusing.render.raster import clip_space, rasterize

F64 = torch.float64


def front_camera(res=40, eye=(0.0, 0.0, 2.0)):
    return Camera(look_at(torch.tensor([eye], dtype=F64), torch.zeros(1, 3, dtype=F64)),
                  perspective(40.0, dtype=F64), res, res)


def blob(subdivisions=1, seed=0):
    """A bumpy icosphere (float64 vertices, int64 faces): curved, closed, with silhouettes."""
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.4)
    g = np.random.default_rng(seed)
    v = s.vertices * (1 + 0.15 * g.uniform(-1, 1, (len(s.vertices), 1)))
    return torch.tensor(v, dtype=F64), torch.tensor(s.faces, dtype=torch.int64)


def test_interpolate_gradcheck():
    v, f = blob(1)
    cam = random_cameras(2, resolution=14, generator=torch.Generator().manual_seed(0), dtype=F64)
    tri_id = rasterize(clip_space(v, cam.mvp()), f, 14, 14)
    assert int((tri_id >= 0).sum()) > 60
    v = v.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: interpolate(x, f, cam, tri_id)[..., :4], (v,), eps=1e-6, atol=1e-6)


def test_render_losses_match_central_differences():
    """Depth and normal L1 losses through `render_mesh` (visibility fixed under the small steps used)."""
    v, f = blob(2, seed=1)
    cam = random_cameras(2, resolution=24, generator=torch.Generator().manual_seed(1), dtype=F64)
    g = torch.Generator().manual_seed(2)
    target_d = torch.rand(2, 24, 24, dtype=F64, generator=g) * 3
    target_n = torch.randn(2, 24, 24, 3, dtype=F64, generator=g)

    def losses(x):
        out = render_mesh(x, f, cam, antialias=False)
        return (out.depth - target_d).abs().mean(), (out.normal - target_n).abs().mean(), out.tri_id

    x = v.clone().requires_grad_()
    ld, ln, ids = losses(x)
    gd, = torch.autograd.grad(ld, x, retain_graph=True)
    gn, = torch.autograd.grad(ln, x)
    eps = 1e-6
    for k in range(4):
        d = torch.randn(v.shape, dtype=F64, generator=g)
        with torch.no_grad():
            pd, pn, ids_p = losses(v + eps * d)
            md, mn, ids_m = losses(v - eps * d)
        assert torch.equal(ids_p, ids) and torch.equal(ids_m, ids)
        assert float((pd - md) / (2 * eps)) == pytest.approx(float((gd * d).sum()), rel=1e-5, abs=1e-9)
        assert float((pn - mn) / (2 * eps)) == pytest.approx(float((gn * d).sum()), rel=1e-5, abs=1e-9)


TRIANGLE = [[-0.4, -0.35, 0.0], [0.45, -0.3, 0.05], [0.05, 0.42, -0.1]]


def projected_area(v, cam):
    ndc, _ = cam.project(v)
    uv = (ndc[0, :, :2] + 1) * (cam.width / 2)
    a, b = uv[1] - uv[0], uv[2] - uv[0]
    return 0.5 * (a[0] * b[1] - a[1] * b[0]).abs()


def test_antialiased_mask_gradient_matches_differences_and_area():
    cam = front_camera(40)
    v = torch.tensor(TRIANGLE, dtype=F64, requires_grad=True)
    f = torch.tensor([[0, 1, 2]])
    out = render_mesh(v, f, cam)
    grad, = torch.autograd.grad(out.mask.sum(), v)
    # the antialiased coverage approximates the projected area, and its gradient the area's gradient
    area = projected_area(v, cam)
    assert float(out.mask.sum().detach()) == pytest.approx(float(area.detach()), rel=0.01)
    g_area, = torch.autograd.grad(area, v)
    cos = torch.nn.functional.cosine_similarity(grad.flatten(), g_area.flatten(), dim=0)
    assert float(cos) > 0.995 and float((grad - g_area).norm() / g_area.norm()) < 0.1
    eps = 1e-5
    for k in range(3):
        for c in range(2):
            d = torch.zeros_like(v)
            d[k, c] = eps
            with torch.no_grad():
                fd = (render_mesh(v + d, f, cam).mask.sum() - render_mesh(v - d, f, cam).mask.sum()) / (2 * eps)
            assert float(grad[k, c]) == pytest.approx(float(fd), rel=0.05)
            assert abs(float(grad[k, c])) > 5                                  # silhouette vertices matter


def test_silhouette_moves_towards_target():
    """Fitting the antialiased mask of a smaller triangle to a larger one's moves the vertices outwards."""
    cam = front_camera(32)
    f = torch.tensor([[0, 1, 2]])
    target_v = torch.tensor(TRIANGLE, dtype=F64)
    target = render_mesh(target_v, f, cam).mask
    v = (target_v * 0.85).requires_grad_()
    opt = torch.optim.Adam([v], lr=0.01)
    start = float((v.detach() - target_v).norm())
    for _ in range(40):
        opt.zero_grad()
        loss = (render_mesh(v, f, cam).mask - target).abs().mean()
        loss.backward()
        opt.step()
    assert float((v.detach()[:, :2] - target_v[:, :2]).norm()) < 0.25 * start


def test_antialias_interior_edges_are_not_blended():
    """On a convex closed mesh, pixel pairs across interior edges keep their values; only silhouettes blend."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    v, f = torch.tensor(sphere.vertices, dtype=F64), torch.tensor(sphere.faces)
    cam = front_camera(48)
    hard = render_mesh(v, f, cam, antialias=False)
    soft = render_mesh(v, f, cam)
    changed = (soft.mask - hard.mask).abs() > 0
    inside = (hard.tri_id >= 0)
    # pixels whose 4-neighbourhood is covered are interior: they must be untouched
    pad = torch.nn.functional.pad(inside.float()[:, None], (1, 1, 1, 1))[:, 0]
    interior = inside & (pad[:, :-2, 1:-1] > 0) & (pad[:, 2:, 1:-1] > 0) & (pad[:, 1:-1, :-2] > 0) & (pad[:, 1:-1, 2:] > 0)
    assert int(changed.sum()) > 20
    assert not changed[interior].any()
    assert torch.equal(soft.depth[interior], hard.depth[interior])


def test_mesh_topology():
    v, f = blob(1)
    topo = mesh_topology(f, len(v))
    assert (topo.adjacent >= 0).all() and (topo.opposite >= 0).all()           # closed mesh: no boundary
    for face in range(0, len(f), 7):
        for k in range(3):
            a, b = int(f[face, (k + 1) % 3]), int(f[face, (k + 2) % 3])
            n, o = int(topo.adjacent[face, k]), int(topo.opposite[face, k])
            assert n != face and set(f[n].tolist()) == {a, b, o}
    open_topo = mesh_topology(f[1:], len(v))
    assert int((open_topo.adjacent < 0).sum()) == 3 and int((open_topo.opposite < 0).sum()) == 3


def test_pixel_barycentrics_reproduce_depth():
    from focusing.render.interpolate import pixel_barycentrics

    v, f = blob(2, seed=4)
    cam = random_cameras(2, resolution=20, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = render_mesh(v, f, cam, antialias=False)
    bary = pixel_barycentrics(clip_space(v, cam.mvp()), f, out.tri_id)
    covered = out.tri_id >= 0
    assert torch.allclose(bary.sum(-1)[covered], torch.ones(int(covered.sum()), dtype=F64))
    assert (bary[covered] > -1e-9).all() and (bary[~covered] == 0).all()
    # interpolating the corners' camera depth with them gives the rendered depth
    cam_depth = -(v @ cam.view[:, 2, :3].transpose(0, 1) + cam.view[:, 2, 3])          # [V, B]
    tri = f[out.tri_id.clamp_min(0)]                                                   # [B, H, W, 3]
    corner_depth = torch.stack([cam_depth[:, b][tri[b]] for b in range(2)])            # [B, H, W, 3]
    assert torch.allclose((bary * corner_depth).sum(-1)[covered], out.depth[covered], rtol=1e-10)
