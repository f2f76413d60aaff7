"""Visibility: the reference rasteriser against ray casting (embree), near-plane clipping, Triton parity."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from focusing.io import load_mesh, normalize
from focusing.render import Camera, look_at, perspective, random_cameras, render_mesh
from focusing.render.raster import clip_space, rasterize

ROOT = Path(__file__).resolve().parents[1]


def cast_rays(mesh, camera: Camera, b: int, from_eye: bool = False):
    """Ray-cast reference for camera b: (tri_id [H*W] with -1 misses, exact float64 depth [H*W]).

    Rays pass through pixel centres and start on the near plane (so near clipping is part of the reference),
    or at the camera centre if `from_eye`.
    """
    from trimesh import Trimesh
    from trimesh.ray.ray_pyembree import RayMeshIntersector

    h, w = camera.height, camera.width
    inv = torch.linalg.inv(camera.mvp()[b].double())
    x = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
    y = 1 - (2 * torch.arange(h, dtype=torch.float64) + 1) / h
    yy, xx = torch.meshgrid(y, x, indexing="ij")

    def unproject(z):
        p = torch.stack([xx, yy, torch.full_like(xx, z), torch.ones_like(xx)], -1).reshape(-1, 4) @ inv.T
        return p[:, :3] / p[:, 3:]

    origin, far = unproject(-1.0), unproject(1.0)
    direction = far - origin
    if from_eye:
        origin = camera.eye[b].double().expand_as(origin)
    tri = RayMeshIntersector(Trimesh(mesh.vertices, mesh.faces, process=False)).intersects_first(
        origin.numpy(), direction.numpy())
    tri = torch.as_tensor(tri, dtype=torch.int64)
    # exact depth of the hit triangle's plane along each ray, in float64
    v = torch.as_tensor(mesh.vertices)[torch.as_tensor(mesh.faces)[tri.clamp_min(0)]]
    n = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    t = ((v[:, 0] - origin) * n).sum(1) / (direction * n).sum(1)
    point = origin + t[:, None] * direction
    view = camera.view[b].double()
    depth = -(point @ view[2, :3] + view[2, 3])
    return tri, depth


def compare(mesh, camera, out):
    for b in range(len(camera)):
        ref_tri, ref_depth = cast_rays(mesh, camera, b)
        tri = out.tri_id[b].reshape(-1)
        ref_cov, cov = ref_tri >= 0, tri >= 0
        covered = int(ref_cov.sum())
        assert covered > 200
        assert int((ref_cov != cov).sum()) <= max(1, covered // 1000)          # coverage agrees on 99.9%
        both = ref_cov & cov
        same = both & (ref_tri == tri)
        assert int(same.sum()) >= 0.999 * int(both.sum())                     # same triangle on 99.9%
        depth = out.depth[b].reshape(-1).double()
        rel = ((depth - ref_depth).abs() / ref_depth)[same]
        assert float(rel.max()) < 1e-5


@pytest.mark.parametrize("name", ["fertility", "lilium_surface", "gear_ring", "milk_truck"])
def test_matches_ray_casting(data_dir, name):
    mesh, _ = normalize(load_mesh(data_dir / f"{name}.ply"))
    cam = random_cameras(2, resolution=(72, 88), generator=torch.Generator().manual_seed(len(name)))
    v = torch.as_tensor(mesh.vertices, dtype=torch.float32)
    out = render_mesh(v, torch.as_tensor(mesh.faces), cam, antialias=False, backend="torch")
    compare(mesh, cam, out)


def test_zoomed_view_matches_ray_casting(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "fandisk.ply"))
    cam = random_cameras(1, resolution=64, generator=torch.Generator().manual_seed(7))
    cam = cam.zoomed(torch.tensor([[-0.3, 0.1, -0.2, 0.25]]), s=1.1)
    out = render_mesh(torch.as_tensor(mesh.vertices, dtype=torch.float32), torch.as_tensor(mesh.faces), cam,
                      antialias=False)
    compare(mesh, cam, out)


def test_near_plane_is_clipped_exactly():
    """A large triangle crossing the near plane: exactly the pixels whose ray hits it beyond the near plane."""
    from focusing.io import Mesh

    view = look_at(torch.zeros(1, 3), torch.tensor([[0.0, 0.0, -1.0]]))               # identity camera
    near = 0.5
    cam = Camera(view, perspective(60.0, 1.0, near=near, far=10.0), 48, 48)
    tri = np.array([[0.0, -0.1, 0.5], [-1.0, -0.1, -3.0], [1.2, 0.3, -3.0]])          # vertex 0 behind the eye
    mesh = Mesh(tri, np.array([[0, 1, 2]]))
    out = render_mesh(torch.as_tensor(tri, dtype=torch.float32), torch.as_tensor(mesh.faces), cam, antialias=False)
    ref_tri, ref_depth = cast_rays(mesh, cam, 0)
    cov, ref_cov = out.tri_id[0].reshape(-1) >= 0, ref_tri >= 0
    assert int(ref_cov.sum()) > 100 and int((cov != ref_cov).sum()) <= 2
    hit = cov & ref_cov
    assert float(out.depth[0].reshape(-1)[hit].min()) >= near * (1 - 1e-6)
    assert torch.allclose(out.depth[0].reshape(-1)[hit].double(), ref_depth[hit], rtol=1e-5)
    # rays from the eye also hit the part in front of the near plane: those pixels must stay empty
    eye_tri, _ = cast_rays(mesh, cam, 0, from_eye=True)
    clipped = (eye_tri >= 0) & ~ref_cov
    assert int(clipped.sum()) > 50 and not cov[clipped].any()


def test_depth_ties_go_to_lower_id_and_batches_are_independent():
    tri = torch.tensor([[-0.4, -0.4, 0.0], [0.4, -0.4, 0.0], [0.0, 0.4, 0.0]])
    v = torch.cat([tri, tri, tri + torch.tensor([0.0, 0.0, 0.2])])                  # 0 and 1 coincide, 2 in front
    f = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    eye = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -2.0]])
    cam = Camera(look_at(eye, torch.zeros(2, 3)), perspective(40.0), 32, 32)
    ids = rasterize(clip_space(v, cam.mvp()), f, 32, 32, backend="torch")
    seen = [set(ids[b][ids[b] >= 0].tolist()) for b in range(2)]
    assert seen[0] == {2} and seen[1] == {0}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                    reason="triton not installed, or CUDA runs the kernels for real (gpu tests)")
def test_triton_kernels_under_interpreter(data_dir):
    """Runs both Triton kernels (visibility, silhouette search) through TRITON_INTERPRET=1 on CPU at tiny sizes:
    they must reproduce the PyTorch reference exactly."""
    script = r"""
import torch
from focusing.io import load_mesh, normalize
from focusing.render import Camera, look_at, random_cameras, render_mesh
from focusing.render.antialias import mesh_topology, find_silhouette_crossings
from focusing.render.antialias_triton import find_silhouette_crossings_triton
from focusing.render.raster import clip_space, rasterize_keys_reference
from focusing.render.raster_triton import rasterize_keys_triton
m, _ = normalize(load_mesh(DATA + "/idler_riser.ply"))
v = torch.tensor(m.vertices, dtype=torch.float32)
f = torch.tensor(m.faces)
# two big triangles (one crossing the near plane) exercise the large-triangle kernel and near clipping
v = torch.cat([v, torch.tensor([[-0.6, -0.6, -0.3], [0.6, -0.5, -0.3], [0.0, 0.6, 0.2],
                                [-0.5, 0.0, 1.9], [0.5, 0.1, 1.9], [0.0, 0.5, 2.4]])])
f = torch.cat([f, torch.tensor([[len(v) - 6, len(v) - 5, len(v) - 4], [len(v) - 3, len(v) - 2, len(v) - 1]])])
cam = random_cameras(2, resolution=(20, 24), generator=torch.Generator().manual_seed(0))
cam = Camera(torch.cat([cam.view, look_at(torch.tensor([[0.0, 0.1, 2.0]]), torch.zeros(1, 3))]),
             torch.cat([cam.proj, cam.proj[:1]]), 20, 24)
clip = clip_space(v, cam.mvp()).contiguous()
ref = rasterize_keys_reference(clip, f, 20, 24)
fast = rasterize_keys_triton(clip, f, 20, 24)
assert (ref != torch.iinfo(torch.int64).max).sum() > 300, "too little coverage to be a test"
assert torch.equal(ref, fast), f"{int((ref != fast).sum())} keys differ"
# silhouette walk: a fine mesh at a tiny image walks several faces per pair
m, _ = normalize(load_mesh(DATA + "/fandisk.ply"))
v, f = torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)
cam = random_cameras(1, resolution=(14, 12), generator=torch.Generator().manual_seed(1))
out = render_mesh(v, f, cam, antialias=False, backend="torch")
clip, topo = clip_space(v, cam.mvp()), mesh_topology(f, len(v))
a = find_silhouette_crossings(out.tri_id, out.depth, clip, f, topo, max_steps=6)
b = find_silhouette_crossings_triton(out.tri_id, out.depth, clip, f, topo.table, 6)
key = lambda c: sorted(zip(*(t.tolist() for t in (c.p0, c.p1, c.front, c.edge_a, c.edge_b))))
assert len(a.p0) > 10 and key(a) == key(b), (len(a.p0), len(b.p0))
assert len(find_silhouette_crossings(out.tri_id, out.depth, clip, f, topo, max_steps=1).p0) < len(a.p0)
print("ok")
"""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    res = subprocess.run([sys.executable, "-c", f"DATA = {str(data_dir)!r}\n" + script], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
def test_triton_matches_reference_on_cuda(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "fertility.ply"))
    v = torch.as_tensor(mesh.vertices, dtype=torch.float32, device="cuda")
    f = torch.as_tensor(mesh.faces, device="cuda")
    cam = random_cameras(3, resolution=(200, 260), generator=torch.Generator().manual_seed(0), device="cuda")
    zoom = cam.zoomed(torch.tensor([[-0.2, 0.2, -0.1, 0.3]], device="cuda").expand(3, 4), 1.1)
    cam = Camera(cam.view, torch.cat([cam.proj[:2], zoom.proj[2:]]), cam.height, cam.width)
    clip = clip_space(v, cam.mvp())
    ref = rasterize(clip, f, cam.height, cam.width, backend="torch")
    fast = rasterize(clip, f, cam.height, cam.width, backend="triton")
    assert int((ref >= 0).sum()) > 10000
    assert float((ref == fast).float().mean()) >= 0.9999
    # whole pipeline: same images and gradients up to the few pixels where float contraction flips a decision
    outs, grads = [], []
    for backend in ("torch", "triton"):
        x = v.clone().requires_grad_()
        out = render_mesh(x, f, cam, backend=backend)
        (out.depth.mean() + out.normal.abs().mean() + out.mask.mean()).backward()
        outs.append(out)
        grads.append(x.grad)
    assert float((outs[0].tri_id == outs[1].tri_id).float().mean()) >= 0.9999
    for name in ("depth", "mask"):
        diff = (getattr(outs[0], name) - getattr(outs[1], name)).abs()
        assert float((diff > 1e-4).float().mean()) < 1e-3, name
    assert float(torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0)) > 0.999


@pytest.mark.gpu
def test_silhouette_search_triton_matches_reference_on_cuda(data_dir):
    from focusing.render.antialias import find_silhouette_crossings, mesh_topology
    from focusing.render.antialias_triton import find_silhouette_crossings_triton

    mesh, _ = normalize(load_mesh(data_dir / "lilium_surface.ply"))
    v = torch.as_tensor(mesh.vertices, dtype=torch.float32, device="cuda")
    f = torch.as_tensor(mesh.faces, device="cuda")
    cam = random_cameras(2, resolution=160, generator=torch.Generator().manual_seed(5), device="cuda")
    out = render_mesh(v, f, cam, antialias=False, backend="torch")
    clip, topo = clip_space(v, cam.mvp()), mesh_topology(f, len(v))
    a = find_silhouette_crossings(out.tri_id, out.depth, clip, f, topo)
    b = find_silhouette_crossings_triton(out.tri_id, out.depth, clip, f, topo.table, 32)
    key = lambda c: set(zip(*(t.tolist() for t in (c.p0, c.p1, c.front, c.edge_a, c.edge_b))))  # noqa: E731
    ka, kb = key(a), key(b)
    assert len(ka) > 200 and len(ka ^ kb) <= 0.01 * len(ka)
