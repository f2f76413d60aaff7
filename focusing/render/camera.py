"""Cameras: look-at extrinsics, OpenGL-style projections, random views on a sphere, the zoom crop (Eq. 4).

The one camera convention of the project (also in docs/CONVENTIONS.md, "Cameras"):

- **World** is the normalised object frame ([-0.5, 0.5]^3). `view` [B, 4, 4] maps world to camera space.
- **Camera space** is OpenGL's: the camera sits at the origin, looks down -Z, +X is right, +Y is up.
  **Depth** is the positive distance along the view axis, depth = -z_camera.
- **Clip space**: `proj` [B, 4, 4] maps camera space to homogeneous clip coordinates (x, y, z, w), OpenGL
  style, with w = -z_camera = depth for the perspective matrices built here. **NDC** = (x, y, z) / w, each in
  [-1, 1] inside the frustum; x_ndc = -1 is the left image border, y_ndc = +1 the top border, z_ndc = -1 the
  near plane and +1 the far plane.
- **Pixels**: images are [H, W] arrays with **row 0 at the top** (the way PNGs and numpy show them) and column 0
  at the left. Pixel (row i, col j) covers the NDC square whose centre is
  x = (2j + 1) / W - 1, y = 1 - (2i + 1) / H. Continuous pixel coordinates (u, v) = ((x + 1) W / 2,
  (1 - y) H / 2) put pixel (i, j)'s centre at (j + 0.5, i + 0.5); `ndc_to_pixel` / `pixel_to_ndc` convert.
- **Intrinsics** in pixels (fx, fy, cx, cy) follow OpenCV: u_cv = fx X / Z + cx with pixel centres at integer
  coordinates (so the centred principal point is cx = (W - 1) / 2); `intrinsics_projection` turns them into
  the OpenGL matrix above.
- **Zoom crop** (paper Eq. 4): a 4x4 applied on the left of `proj` that maps an NDC box
  (xmin, xmax, ymin, ymax) to [-s, s]^2, scaling about the box centre. With s = 1 the box fills the viewport
  exactly; with s > 1 (the paper uses 1.1) only the inner 1/s of the box is visible, so the jagged border of a
  carved voxel set falls outside the image. The paper's printed matrix reuses x in the y translation and does
  not scale the translation by s (which would move the box centre off the image centre when s != 1); we use y
  and scale about the centre. z and w are untouched, so depth is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Camera:
    """A batch of B pinhole cameras sharing one image size.

    view: [B, 4, 4] world -> camera (OpenGL: looks down -Z, +Y up); proj: [B, 4, 4] camera -> clip;
    height, width: image size in pixels. [4, 4] matrices are promoted to a batch of one.
    """

    view: Tensor
    proj: Tensor
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.view.dim() == 2:
            self.view = self.view[None]
        if self.proj.dim() == 2:
            self.proj = self.proj[None]
        if self.view.shape[-2:] != (4, 4) or self.proj.shape[-2:] != (4, 4):
            raise ValueError(f"view/proj must be [B,4,4], got {tuple(self.view.shape)} and {tuple(self.proj.shape)}")
        if len(self.view) != len(self.proj):
            if len(self.proj) == 1:
                self.proj = self.proj.expand(len(self.view), 4, 4)
            elif len(self.view) == 1:
                self.view = self.view.expand(len(self.proj), 4, 4)
            else:
                raise ValueError(f"view batch {len(self.view)} != proj batch {len(self.proj)}")
        self.height, self.width = int(self.height), int(self.width)

    def __len__(self) -> int:
        return self.view.shape[0]

    def __getitem__(self, index) -> Camera:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Camera(self.view[index], self.proj[index], self.height, self.width)

    @staticmethod
    def cat(cameras: list[Camera]) -> Camera:
        """The views of `cameras` (one image size) as one batch, in order."""
        sizes = {(c.height, c.width) for c in cameras}
        if len(sizes) != 1:
            raise ValueError(f"cameras of different image sizes cannot form one batch: {sorted(sizes)}")
        (height, width), = sizes
        return Camera(torch.cat([c.view for c in cameras]), torch.cat([c.proj for c in cameras]), height, width)

    @property
    def device(self) -> torch.device:
        return self.view.device

    @property
    def dtype(self) -> torch.dtype:
        return self.view.dtype

    def to(self, device=None, dtype=None) -> Camera:
        return Camera(self.view.to(device=device, dtype=dtype), self.proj.to(device=device, dtype=dtype),
                      self.height, self.width)

    def mvp(self) -> Tensor:
        """[B, 4, 4] world -> clip (proj @ view)."""
        return self.proj @ self.view

    @property
    def eye(self) -> Tensor:
        """[B, 3] camera centres in world space."""
        rot, t = self.view[:, :3, :3], self.view[:, :3, 3]
        return -(rot.transpose(1, 2) @ t[..., None])[..., 0]

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """World points [N, 3] (shared) or [B, N, 3] -> (ndc [B, N, 3], depth [B, N]).

        depth = -z_camera (positive in front of the camera). NDC of points behind the camera is meaningless.
        """
        if points.dim() == 2:
            points = points[None].expand(len(self), -1, -1)
        points = points.to(self.view.dtype)
        homo = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
        clip = homo @ self.mvp().transpose(1, 2)
        depth = -(homo @ self.view[:, 2, :, None])[..., 0]
        return clip[..., :3] / clip[..., 3:], depth

    def zoomed(self, bbox_ndc: Tensor, s: float = 1.1) -> Camera:
        """The same cameras with the NDC box `bbox_ndc` [B, 4] = (xmin, xmax, ymin, ymax) zoomed to [-s, s]^2."""
        crop = zoom_crop(torch.as_tensor(bbox_ndc, dtype=self.proj.dtype, device=self.proj.device), s)
        return Camera(self.view, crop @ self.proj, self.height, self.width)


def _normalize(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def look_at(eye: Tensor, target: Tensor, up=(0.0, 1.0, 0.0)) -> Tensor:
    """[B, 4, 4] world -> camera matrices for cameras at `eye` [B, 3] looking at `target` [B, 3].

    The camera's +Y is as close to `up` as possible; where the view direction is (nearly) parallel to `up`, the
    world axis least aligned with the view direction is used instead.
    """
    eye = torch.as_tensor(eye)
    target = torch.as_tensor(target, dtype=eye.dtype, device=eye.device)
    eye, target = torch.broadcast_tensors(eye.reshape(-1, 3), target.reshape(-1, 3))
    forward = _normalize(target - eye)
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).reshape(-1, 3).expand_as(forward)
    right = torch.linalg.cross(forward, up)
    axis = torch.nn.functional.one_hot(forward.abs().argmin(dim=-1), 3).to(eye.dtype)
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6 * up.norm(dim=-1, keepdim=True)
    right = _normalize(torch.where(degenerate, torch.linalg.cross(forward, axis), right))
    true_up = torch.linalg.cross(right, forward)
    rot = torch.stack([right, true_up, -forward], dim=1)
    view = torch.zeros(len(eye), 4, 4, dtype=eye.dtype, device=eye.device)
    view[:, :3, :3] = rot
    view[:, :3, 3] = -(rot @ eye[..., None])[..., 0]
    view[:, 3, 3] = 1.0
    return view


def perspective(fov_y_deg, aspect=1.0, near: float = 0.1, far: float = 10.0, *, dtype=torch.float32,
                device=None) -> Tensor:
    """OpenGL perspective projection: [4, 4] for a scalar vertical field of view (degrees), [B, 4, 4] for [B].

    Maps camera depth `near` to z_ndc = -1 and `far` to +1; w_clip = -z_camera.
    """
    fov = torch.as_tensor(fov_y_deg, dtype=dtype, device=device)
    aspect = torch.as_tensor(aspect, dtype=dtype, device=device)
    fov, aspect = torch.broadcast_tensors(fov, aspect)
    f = 1.0 / torch.tan(torch.deg2rad(fov) / 2)
    proj = torch.zeros(*fov.shape, 4, 4, dtype=dtype, device=device)
    proj[..., 0, 0] = f / aspect
    proj[..., 1, 1] = f
    proj[..., 2, 2] = (far + near) / (near - far)
    proj[..., 2, 3] = 2.0 * far * near / (near - far)
    proj[..., 3, 2] = -1.0
    return proj


def intrinsics_projection(fx, fy, cx, cy, width: int, height: int, near: float = 0.1, far: float = 10.0, *,
                          dtype=torch.float32, device=None) -> Tensor:
    """OpenGL projection [4, 4] (or [B, 4, 4]) from OpenCV pixel intrinsics (see the module docstring).

    A camera-space point projects to OpenCV pixel (u, v) = (fx X/Z + cx, fy Y/Z + cy) in the OpenCV frame
    (X right, Y down, Z forward), i.e. our pixel (row v, col u) up to the half-pixel centre convention.
    """
    fx, fy, cx, cy = (torch.as_tensor(a, dtype=dtype, device=device) for a in (fx, fy, cx, cy))
    fx, fy, cx, cy = torch.broadcast_tensors(fx, fy, cx, cy)
    proj = torch.zeros(*fx.shape, 4, 4, dtype=dtype, device=device)
    proj[..., 0, 0] = 2.0 * fx / width
    proj[..., 0, 2] = 1.0 - 2.0 * (cx + 0.5) / width
    proj[..., 1, 1] = 2.0 * fy / height
    proj[..., 1, 2] = 2.0 * (cy + 0.5) / height - 1.0
    proj[..., 2, 2] = (far + near) / (near - far)
    proj[..., 2, 3] = 2.0 * far * near / (near - far)
    proj[..., 3, 2] = -1.0
    return proj


def focal_from_fov(fov_y_deg: float, height: int) -> float:
    """Focal length in pixels of a vertical field of view over `height` pixels."""
    return 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)


def zoom_crop(bbox_ndc: Tensor, s: float = 1.1) -> Tensor:
    """Paper Eq. 4: [B, 4, 4] clip-space matrices mapping the NDC box (xmin, xmax, ymin, ymax) [B, 4] to [-s, s]^2.

    Use as `crop @ proj`. x' = s (2x - (xmax + xmin)) / (xmax - xmin), same for y (with y, not the paper's x,
    in the translation); z and w are unchanged.
    """
    bbox = torch.as_tensor(bbox_ndc).reshape(-1, 4)
    xmin, xmax, ymin, ymax = bbox.unbind(-1)
    crop = torch.zeros(len(bbox), 4, 4, dtype=bbox.dtype, device=bbox.device)
    crop[:, 0, 0] = 2.0 * s / (xmax - xmin)
    crop[:, 0, 3] = -s * (xmax + xmin) / (xmax - xmin)
    crop[:, 1, 1] = 2.0 * s / (ymax - ymin)
    crop[:, 1, 3] = -s * (ymax + ymin) / (ymax - ymin)
    crop[:, 2, 2] = 1.0
    crop[:, 3, 3] = 1.0
    return crop


def ndc_to_pixel(xy: Tensor, height: int, width: int) -> Tensor:
    """NDC (x, y) [..., 2] -> continuous pixel coordinates (u, v) [..., 2]; the pixel is (row floor v, col floor u)."""
    return torch.stack([(xy[..., 0] + 1) * (width / 2), (1 - xy[..., 1]) * (height / 2)], dim=-1)


def pixel_to_ndc(uv: Tensor, height: int, width: int) -> Tensor:
    """Continuous pixel coordinates (u, v) [..., 2] -> NDC (x, y) [..., 2] (inverse of `ndc_to_pixel`)."""
    return torch.stack([uv[..., 0] * (2 / width) - 1, 1 - uv[..., 1] * (2 / height)], dim=-1)


def pixel_centers_ndc(height: int, width: int, *, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """NDC x of each column [W] and y of each row [H] at the pixel centres."""
    x = (2 * torch.arange(width, dtype=dtype, device=device) + 1) / width - 1
    y = 1 - (2 * torch.arange(height, dtype=dtype, device=device) + 1) / height
    return x, y


def random_cameras(n: int, *, radius: float = 2.0, fov_deg: float = 40.0, resolution=518, near: float = 0.1,
                   far: float = 10.0, generator: torch.Generator | None = None, device=None,
                   dtype=torch.float32) -> Camera:
    """`n` cameras with eyes uniform on the sphere of `radius` around the origin, looking at the origin.

    resolution: int (square) or (height, width); fov_deg is the vertical field of view.
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    eye = torch.randn(n, 3, generator=generator, dtype=torch.float64,
                      device=generator.device if generator is not None else None)
    eye = (_normalize(eye) * radius).to(dtype=dtype, device=device)
    view = look_at(eye, torch.zeros_like(eye))
    proj = perspective(fov_deg, width / height, near, far, dtype=dtype, device=device).expand(n, 4, 4)
    return Camera(view, proj.contiguous(), height, width)


def orbit_cameras(n: int, *, radius: float = 2.0, elevation_deg: float = 20.0, fov_deg: float = 40.0,
                  resolution=518, near: float = 0.1, far: float = 10.0, device=None,
                  dtype=torch.float32) -> Camera:
    """`n` cameras evenly spaced in azimuth on a circle at `elevation_deg`, looking at the origin (for pictures)."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    az = torch.arange(n, dtype=torch.float64) * (2 * math.pi / max(n, 1))
    el = math.radians(elevation_deg)
    eye = torch.stack([torch.sin(az) * math.cos(el), torch.full_like(az, math.sin(el)), torch.cos(az) * math.cos(el)],
                      dim=-1) * radius
    eye = eye.to(dtype=dtype, device=device)
    view = look_at(eye, torch.zeros_like(eye))
    proj = perspective(fov_deg, width / height, near, far, dtype=dtype, device=device).expand(n, 4, 4)
    return Camera(view, proj.contiguous(), height, width)
