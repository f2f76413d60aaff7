"""View-consistent sparse voxels: depth-based voxel carving (paper §3.2), TripoSF's frustum selection and
adaptive zooming (§3.3).

Before decoding, the latent voxels `coords` [N, 4] (batch, x, y, z) at the latent resolution are reduced to
the ones that matter for the training view of their batch item (camera row b = coords[:, 0]):

- `frustum`: every voxel whose cube meets the view frustum (TripoSF's frustum-aware sectional training);
- `carve`: the voxels in front of the camera, inside the image and not hidden behind the GT depth map
  (d <= D(u, v) + r), plus their 3x3x3 neighbourhood;
- `adaptive_zoom`: around a random carved voxel, the N in [Nmin, Nmax] nearest carved voxels in image space
  set a square crop of the image (Eq. 4, `focusing.render.camera.zoom_crop`); only the voxels seen through the
  zoomed camera are decoded, so the decoded count stays near N whatever the resolution.

`select_voxels` chains them for the trainer and the benchmarks. Everything is vectorised over voxels (CPU and
CUDA); batch items are independent. Geometry is float32 in the normalised frame; depth = -z_camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from focusing.data.grid import CORNER_OFFSETS, voxel_centers
from focusing.render.camera import Camera, ndc_to_pixel
from focusing.render.renderer import render_mesh
from focusing.sparse.lookup import dilate_within

Tensor = torch.Tensor

MODES = ("none", "frustum", "carve")


def gt_depth_for_carving(vertices: Tensor, faces: Tensor, camera: Camera) -> Tensor:
    """[B, H, W] GT depth (-z_camera) of the mesh `vertices` [V, 3] / `faces` [F, 3], +inf on background pixels.

    Rendered without antialiasing: antialiased depth fades to 0 at silhouettes, which would carve away the
    voxels just behind every silhouette pixel.
    """
    with torch.no_grad():
        out = render_mesh(vertices, faces, camera, antialias=False)
    return torch.where(out.tri_id >= 0, out.depth, torch.full_like(out.depth, math.inf))


def _camera_rows(coords: Tensor, camera: Camera) -> Tensor:
    """[N] int64 camera row of each voxel (its batch index), checked against the number of cameras."""
    b = coords[:, 0].to(torch.int64)
    if len(b) and int(b.max()) >= len(camera):
        raise ValueError(f"voxels of batch item {int(b.max())} but only {len(camera)} cameras")
    return b.to(camera.device)


def _clip(coords: Tensor, resolution: int, camera: Camera, offset: Tensor | float = 0.5) -> tuple[Tensor, Tensor]:
    """Points (ijk + offset) / R - 0.5 of voxels `coords` [N, 4] in clip space through camera row coords[:, 0],
    and their depth. offset 0.5: the centres -> ([N, 4], [N]); offsets [K, 3] (e.g. `CORNER_OFFSETS`): every
    voxel at each offset -> ([K, N, 4], [K, N])."""
    b = _camera_rows(coords, camera)
    xyz = coords[:, 1:].to(device=camera.device, dtype=camera.dtype)
    offset = torch.as_tensor(offset, dtype=camera.dtype, device=camera.device)
    points = (xyz + (offset[..., None, :] if offset.dim() == 2 else offset)) / resolution - 0.5
    homo = torch.cat([points, torch.ones_like(points[..., :1])], -1)
    clip = torch.einsum("nij,...nj->...ni", camera.mvp()[b], homo)
    depth = -(camera.view[b, 2] * homo).sum(-1)
    return clip, depth


def project_centers(coords: Tensor, resolution: int, camera: Camera) -> tuple[Tensor, Tensor]:
    """Voxel centres ((ijk + 0.5) / R - 0.5) of `coords` [N, 4] projected with camera[coords[:, 0]].

    Returns (ndc [N, 3], depth [N]), depth = -z_camera (positive in front). NDC is meaningless for points
    behind the camera (see `visible_in_image`).
    """
    clip, depth = _clip(coords, resolution, camera)
    return clip[:, :3] / clip[:, 3:], depth


def _in_image(clip: Tensor) -> Tensor:
    """[...] bool: clip-space points [..., 4] in front of the near plane (w > 0, z_ndc >= -1) with |x|, |y| <= 1
    in NDC."""
    x, y, z, w = clip.unbind(-1)
    return (w > 0) & (z + w >= 0) & (x.abs() <= w) & (y.abs() <= w)


def visible_in_image(coords: Tensor, resolution: int, camera: Camera) -> Tensor:
    """[N] bool: the voxel centre lies in front of the near plane and projects inside the image."""
    return _in_image(_clip(coords, resolution, camera)[0])


def carve(coords: Tensor, resolution: int, camera: Camera, depth_map: Tensor, r: float, *,
          dilate: bool = True, corners: bool = True) -> Tensor:
    """Depth-based voxel carving (§3.2): [N] bool of the voxels of `coords` [N, 4] to decode for the view.

    Voxel i (centre projected with camera row b = coords[i, 0] to pixel (u, v), depth d) is kept if its centre
    is in front of the camera (z_ndc >= -1), projects inside the image, and d <= D_b(u, v) + r, with
    D = `depth_map` [B, H, W] (+inf on background, `gt_depth_for_carving`) at the pixel containing the
    projection. `r` is 2 / R in the paper, R the OUTPUT resolution (the caller passes it).
    The paper prints the inequality the other way round ("filter all voxels where d > D - r"); we keep the
    voxels that are NOT hidden behind the visible surface, i.e. the complement of that filter plus a tolerance
    r, which is what the rest of the paper (and Fig. 2) describes.
    corners: also keep the voxel when one of its 8 corners passes the same test (at its own pixel). The
    centre alone loses surfaces seen at grazing angles: a face that cuts a layer of voxels with all their
    centres just behind it lies, along the view rays, up to (distance to the face) / sin(angle) in front of
    them, far more than r, and no neighbour on the camera side exists to be dilated from (measured: up to 28%
    of an object's pixels lost in a view of a CAD part at R = 64). False: the paper's centre-only test.
    dilate: then add the 3x3x3 neighbourhood of every kept voxel, restricted to voxels of `coords` of the same
    batch item (robustness at the image border and for surfaces whose voxel centre lies just behind them).
    """
    b = _camera_rows(coords, camera)
    depth_map = depth_map.to(device=camera.device, dtype=camera.dtype)
    centre = torch.full((1, 3), 0.5, dtype=camera.dtype, device=camera.device)
    offsets = torch.cat([centre, CORNER_OFFSETS.to(centre)]) if corners else centre
    clip, depth = _clip(coords, resolution, camera, offsets)  # [K, N, 4], [K, N]: every point at once
    inside = _in_image(clip)
    w = torch.where(inside, clip[..., 3], torch.ones_like(clip[..., 3]))
    uv = ndc_to_pixel(torch.where(inside[..., None], clip[..., :2] / w[..., None], torch.zeros_like(clip[..., :2])),
                      camera.height, camera.width)
    col = uv[..., 0].floor().long().clamp_(0, camera.width - 1)
    row = uv[..., 1].floor().long().clamp_(0, camera.height - 1)
    keep = (inside & (depth <= depth_map[b, row, col] + r)).any(0).to(coords.device)
    return dilate_within(coords, resolution, keep) if dilate else keep


def frustum_planes(camera: Camera, near: float | None = None, far: float | None = None) -> Tensor:
    """[B, 6, 4] world-space planes (a, b, c, d), inside where a x + b y + c z + d >= 0, |(a, b, c)| = 1:
    left, right, bottom, top (Gribb-Hartmann, from proj @ view, so zoomed cameras work), near, far.

    near / far: depths (-z_camera) that replace the camera's own near / far planes.
    """
    m = camera.mvp()
    rows = [m[:, 3] + m[:, 0], m[:, 3] - m[:, 0], m[:, 3] + m[:, 1], m[:, 3] - m[:, 1]]
    depth_row = -camera.view[:, 2]  # depth = depth_row . (x, 1)
    unit = torch.zeros_like(depth_row)
    unit[:, 3] = 1
    rows.append(m[:, 3] + m[:, 2] if near is None else depth_row - near * unit)
    rows.append(m[:, 3] - m[:, 2] if far is None else far * unit - depth_row)
    planes = torch.stack(rows, 1)
    return planes / planes[..., :3].norm(dim=-1, keepdim=True).clamp_min(1e-12)


def frustum(coords: Tensor, resolution: int, camera: Camera, *, near: float | None = None,
            far: float | None = None) -> Tensor:
    """TripoSF's frustum-aware sectional selection: [N] bool of the voxels whose CUBE meets the view frustum.

    Tested with the cube's bounding sphere (radius sqrt(3) / (2 R)) against each of the 6 planes: conservative,
    every voxel with a point inside the frustum is kept (and a few just outside its edges). near / far
    (depths) override the camera's own near / far planes.
    """
    b = _camera_rows(coords, camera)
    centres = voxel_centers(coords, resolution).to(device=camera.device, dtype=camera.dtype)
    planes = frustum_planes(camera, near, far)[b]  # [N, 6, 4]
    dist = (planes[..., :3] * centres[:, None]).sum(-1) + planes[..., 3]
    return (dist >= -math.sqrt(3) / (2 * resolution)).all(1).to(coords.device)


def zoom_window(coords: Tensor, resolution: int, camera: Camera, centre: int, n: int,
                s: float = 1.1) -> tuple[Tensor, Tensor]:
    """The zoom of one batch item: KNN in image space around voxel `centre`, squared bounding box, Eq. 4 box.

    coords [M, 4]: the item's candidate (kept) voxels; camera: its camera (one row). Takes the `n` voxels whose
    centres are nearest to voxel `centre`'s in pixels (aspect-correct), bounds the projections of their cube
    corners (so their cubes, hence their surfaces, are inside) and squares the box in NDC (equal NDC half sizes
    = the image's aspect, so the zoom does not stretch the image). The visible window is capped at the full
    view and moved inside it (the zoomed image never shows what carving did not look at). Eq. 4 maps the box to
    [-s, s]^2, i.e. shows its inner 1/s: the box returned is the window scaled by s about its centre, so the
    zoomed camera shows exactly the window and contains the chosen voxels; the crop set's jagged border is kept
    out of view by the dilation of `adaptive_zoom`.

    Returns (bbox_ndc [4] = (xmin, xmax, ymin, ymax) for `Camera.zoomed(bbox, s)`, chosen [n] indices into coords).
    """
    ndc = camera.project(voxel_centers(coords, resolution).to(camera.dtype))[0][0, :, :2]
    scale = torch.tensor([camera.width / 2, camera.height / 2], device=ndc.device, dtype=ndc.dtype)
    dist = ((ndc - ndc[centre]) * scale).square().sum(1)
    chosen = torch.topk(dist, min(n, len(dist)), largest=False).indices
    corners = (coords[chosen, None, 1:] + CORNER_OFFSETS.to(coords.device)).reshape(-1, 3)
    corner_ndc, corner_depth = camera.project((corners.to(camera.dtype) / resolution - 0.5).to(camera.device))
    centre_ndc = ndc[chosen].repeat_interleave(8, 0)
    xy = torch.where(corner_depth[0, :, None] > 0, corner_ndc[0, :, :2], centre_ndc)  # corners behind: use centre
    lo, hi = xy.amin(0), xy.amax(0)
    half = ((hi - lo) / 2).amax().clamp(max=1.0)
    mid = ((lo + hi) / 2).clamp(-1 + half, 1 - half)
    bbox = torch.stack([mid[0] - s * half, mid[0] + s * half, mid[1] - s * half, mid[1] + s * half])
    return bbox, chosen


def adaptive_zoom(coords: Tensor, resolution: int, camera: Camera, keep: Tensor, n_range: tuple[int, int], *,
                  s: float = 1.1, generator: torch.Generator | None = None) -> tuple[Camera, Tensor]:
    """Adaptive zooming (§3.3): per batch item, zoom onto N in [n_min, n_max] nearest kept voxels in image space.

    Item b: a random kept voxel's projection is the centre, N is uniform in [n_min, n_max]; `zoom_window` gives
    the square crop, `Camera.zoomed(bbox, s)` (Eq. 4) the zoomed camera. The crop set is every kept voxel whose
    centre is inside the zoomed view (so nothing visible in the zoomed image is missing: at least the KNN set,
    a bit more because the box is square), then 3x3x3-dilated within `coords`. Items with <= n_min kept voxels
    are not zoomed (camera row unchanged, crop = keep).
    The random draws (N and a centre fraction per camera row, in row order) are made up front, so an item's
    result depends only on its own voxels, camera and position in the batch.

    Returns (zoomed cameras [B], crop [N] bool).
    """
    n_min, n_max = n_range
    rng_device = generator.device if generator is not None else None
    draws = [(int(torch.randint(n_min, n_max + 1, (1,), generator=generator, device=rng_device)),
              float(torch.rand(1, generator=generator, device=rng_device, dtype=torch.float64)))
             for _ in range(len(camera))]  # (N, centre fraction) per row, whatever the items hold
    batch = coords[:, 0].to(camera.device)
    keep_dev = keep.to(camera.device)
    proj = camera.proj.clone()
    zoomed_items = []
    for b in range(len(camera)):
        idx = torch.nonzero(keep_dev & (batch == b)).squeeze(1)
        if len(idx) <= n_min:
            continue
        n, fraction = draws[b]
        centre = min(int(fraction * len(idx)), len(idx) - 1)
        bbox, _ = zoom_window(coords[idx.to(coords.device)], resolution, camera[b], centre, n, s)
        proj[b] = camera[b].zoomed(bbox[None], s).proj[0]
        zoomed_items.append(b)
    zoomed = Camera(camera.view, proj, camera.height, camera.width)
    if not zoomed_items:
        return zoomed, keep.clone()
    items = torch.zeros(len(camera), dtype=torch.bool, device=camera.device)
    items[zoomed_items] = True
    in_zoom = items[batch]
    seen = keep_dev & in_zoom & visible_in_image(coords, resolution, zoomed)
    crop = dilate_within(coords, resolution, seen.to(coords.device))
    # a dilation from a zoomed item stays in that item (keys include the batch), so unzoomed items keep `keep`
    return zoomed, torch.where(in_zoom.to(coords.device), crop, keep)


@dataclass
class Selection:
    """The voxels to decode: keep [N] bool over the latent voxels, the camera to render GT and prediction with
    (zoomed when zooming), and the number of voxels in / after each stage (totals over the batch)."""

    keep: Tensor
    camera: Camera
    stats: dict[str, int] = field(default_factory=dict)


def select_voxels(coords: Tensor, resolution: int, camera: Camera, *, mode: str, zoom: bool,
                  depth_map: Tensor | None = None, r: float | None = None, n_range: tuple[int, int] | None = None,
                  s: float = 1.1, near: float | None = None, far: float | None = None,
                  generator: torch.Generator | None = None) -> Selection:
    """The one entry point of the trainer and benchmarks: latent voxels `coords` [N, 4] at `resolution` -> Selection.

    mode: "none" (all voxels), "frustum" (`frustum`, near / far), "carve" (`carve`, needs depth_map [B, H, W]
    and r). zoom: `adaptive_zoom` with n_range and s. The zoomed camera is always chosen on the carved set
    (zoom needs depth_map and r in every mode), so with one generator state all modes see the same pixels:
    carve + zoom decodes the crop set, frustum + zoom the frustum of the zoomed camera, none + zoom all voxels.
    stats: n_latent, n_mode (after the mode), n_carve (the carved set, when computed), n_zoom (after zooming,
    = what is decoded), zoomed_items.
    """
    if mode not in MODES:
        raise ValueError(f"unknown voxel selection mode {mode!r} (choose from {', '.join(MODES)})")
    needs_depth = mode == "carve" or zoom
    if needs_depth and (depth_map is None or r is None):
        raise ValueError(f"mode {mode!r}{' with zoom' if zoom else ''} needs depth_map and r")
    if zoom and n_range is None:
        raise ValueError("zoom needs n_range = (n_min, n_max)")
    stats = {"n_latent": len(coords)}
    carved = carve(coords, resolution, camera, depth_map, r) if needs_depth else None
    if carved is not None:
        stats["n_carve"] = int(carved.sum())
    if mode == "carve":
        keep = carved
    elif mode == "frustum":
        keep = frustum(coords, resolution, camera, near=near, far=far)
    else:
        keep = torch.ones(len(coords), dtype=torch.bool, device=coords.device)
    stats["n_mode"] = int(keep.sum())
    if zoom:
        zoomed, crop = adaptive_zoom(coords, resolution, camera, carved, n_range, s=s, generator=generator)
        stats["zoomed_items"] = int((zoomed.proj != camera.proj).flatten(1).any(1).sum())
        camera = zoomed
        if mode == "carve":
            keep = crop
        elif mode == "frustum":
            keep = frustum(coords, resolution, camera, near=near, far=far)
    stats["n_zoom"] = int(keep.sum())
    return Selection(keep, camera, stats)
