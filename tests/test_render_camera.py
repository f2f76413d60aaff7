"""Cameras: look-at, projections, intrinsics, zoom crop (Eq. 4), pixel convention."""

import math

import pytest
import torch

from focusing.render.camera import (
    Camera,
    focal_from_fov,
    intrinsics_projection,
    look_at,
    ndc_to_pixel,
    perspective,
    pixel_centers_ndc,
    pixel_to_ndc,
    random_cameras,
    zoom_crop,
)


def test_look_at_is_rigid_and_looks_at_target():
    g = torch.Generator().manual_seed(0)
    eye = torch.randn(16, 3, generator=g, dtype=torch.float64) * 3
    eye[0] = torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)      # parallel to up: fallback axis
    target = torch.randn(16, 3, generator=g, dtype=torch.float64) * 0.1
    view = look_at(eye, target)
    rot = view[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(16, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(16, dtype=torch.float64))
    cam_eye = (view @ torch.cat([eye, torch.ones(16, 1, dtype=torch.float64)], 1)[..., None])[:, :3, 0]
    assert torch.allclose(cam_eye, torch.zeros_like(cam_eye), atol=1e-12)
    tgt = (view @ torch.cat([target, torch.ones(16, 1, dtype=torch.float64)], 1)[..., None])[:, :3, 0]
    dist = (target - eye).norm(dim=1)
    assert torch.allclose(tgt, torch.stack([0 * dist, 0 * dist, -dist], 1), atol=1e-10)  # straight down -Z
    # camera +Y has a positive component along world up (except the degenerate one)
    assert (rot[1:, 1, 1] > 0).all()


def test_perspective_near_far_and_fov():
    proj = perspective(60.0, 1.5, near=0.2, far=7.0, dtype=torch.float64)
    for z, expect in [(-0.2, -1.0), (-7.0, 1.0)]:
        clip = proj @ torch.tensor([0.0, 0.0, z, 1.0], dtype=torch.float64)
        assert clip[3] == pytest.approx(-z)
        assert clip[2] / clip[3] == pytest.approx(expect)
    # a point on the top border of the vertical field of view lands on y_ndc = 1
    y = math.tan(math.radians(30))
    clip = proj @ torch.tensor([1.5 * y, y, -1.0, 1.0], dtype=torch.float64)
    assert clip[1] / clip[3] == pytest.approx(1.0) and clip[0] / clip[3] == pytest.approx(1.0)
    assert perspective(torch.tensor([30.0, 40.0])).shape == (2, 4, 4)


def test_intrinsics_match_opencv_pixels():
    width, height, fx, fy, cx, cy = 64, 48, 50.0, 55.0, 30.2, 25.7
    proj = intrinsics_projection(fx, fy, cx, cy, width, height, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(20, 3, generator=g, dtype=torch.float64) * 0.3
    pts[:, 2] = -(pts[:, 2].abs() + 1.0)                                   # in front (OpenGL: -Z)
    clip = torch.cat([pts, torch.ones(20, 1, dtype=torch.float64)], 1) @ proj.T
    uv = ndc_to_pixel(clip[:, :2] / clip[:, 3:], height, width)            # centre of pixel j at u = j + 0.5
    u_cv = fx * pts[:, 0] / -pts[:, 2] + cx                                # OpenCV: Y down, Z forward
    v_cv = fy * -pts[:, 1] / -pts[:, 2] + cy
    assert torch.allclose(uv[:, 0] - 0.5, u_cv, atol=1e-9)
    assert torch.allclose(uv[:, 1] - 0.5, v_cv, atol=1e-9)
    # the centred principal point with the fov's focal length equals `perspective`
    f = focal_from_fov(40.0, height)
    assert torch.allclose(intrinsics_projection(f, f, (width - 1) / 2, (height - 1) / 2, width, height,
                                                dtype=torch.float64),
                          perspective(40.0, width / height, dtype=torch.float64), atol=1e-12)


def test_pixel_convention():
    x, y = pixel_centers_ndc(4, 8, dtype=torch.float64)
    assert x[0] == pytest.approx(-1 + 1 / 8) and x[-1] == pytest.approx(1 - 1 / 8)
    assert y[0] == pytest.approx(1 - 1 / 4)                                  # row 0 is the top row
    uv = ndc_to_pixel(torch.stack([x[3:4], y[2:3]], -1), 4, 8)
    assert torch.allclose(uv, torch.tensor([[3.5, 2.5]], dtype=torch.float64))
    assert torch.allclose(pixel_to_ndc(uv, 4, 8), torch.stack([x[3:4], y[2:3]], -1))


@pytest.mark.parametrize("s", [1.0, 1.1])
def test_zoom_crop_maps_box_onto_viewport(s):
    bbox = torch.tensor([[-0.3, 0.5, -0.9, -0.2], [0.1, 0.2, 0.4, 0.9]], dtype=torch.float64)
    crop = zoom_crop(bbox, s)
    corners = torch.stack([bbox[:, [0, 2]], bbox[:, [1, 3]], bbox[:, [0, 3]]], 1)     # [B, 3, 2]
    w = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)                            # any clip w
    clip = torch.cat([corners * w[None, :, None], torch.zeros(2, 3, 1, dtype=torch.float64),
                      w.expand(2, 3)[..., None]], -1)
    out = clip @ crop.transpose(1, 2)
    ndc = out[..., :2] / out[..., 3:]
    expect = torch.tensor([[-1, -1], [1, 1], [-1, 1]], dtype=torch.float64) * s
    assert torch.allclose(ndc, expect.expand_as(ndc), atol=1e-12)
    assert torch.equal(out[..., 3], clip[..., 3])                                      # depth untouched


def test_camera_batch_project_and_zoom():
    cam = random_cameras(5, radius=2.5, resolution=(30, 40), generator=torch.Generator().manual_seed(3))
    assert len(cam) == 5 and cam.height == 30 and cam.width == 40
    assert torch.allclose(cam.eye.norm(dim=1), torch.full((5,), 2.5), atol=1e-5)
    ndc, depth = cam.project(torch.zeros(1, 3))
    assert torch.allclose(ndc[..., :2], torch.zeros(5, 1, 2), atol=1e-6)              # looks at the origin
    assert torch.allclose(depth, torch.full((5, 1), 2.5), atol=1e-5)
    sub = cam[1:3]
    assert len(sub) == 2 and torch.equal(sub.view, cam.view[1:3]) and len(cam[-1]) == 1
    pts = torch.randn(7, 3, generator=torch.Generator().manual_seed(4)) * 0.3
    ndc, depth = cam.project(pts)
    bbox = torch.tensor([[-0.2, 0.3, -0.1, 0.4]]).expand(5, 4)
    z = cam.zoomed(bbox, 1.0)
    ndc_z, depth_z = z.project(pts)
    assert torch.allclose(depth_z, depth)
    assert torch.allclose(ndc_z[..., 0], (2 * ndc[..., 0] - 0.1) / 0.5, atol=1e-5)
    c64 = cam.to(dtype=torch.float64)
    assert c64.view.dtype == torch.float64 and isinstance(c64, Camera)


def test_camera_cat_joins_views_of_one_image_size():
    cam = random_cameras(5, resolution=(30, 40), generator=torch.Generator().manual_seed(3))
    joined = Camera.cat([cam[0], cam[1:4], cam[4]])
    assert torch.equal(joined.view, cam.view) and torch.equal(joined.proj, cam.proj)
    assert (joined.height, joined.width) == (30, 40)
    with pytest.raises(ValueError, match="image sizes"):
        Camera.cat([cam[0], random_cameras(1, resolution=32)])
