"""`fit`: optimise a SparseFlex field directly (no network) so that its renders match a mesh's renders.

This is the upper bound of what the VAE's decoder can express at resolution R, and a tool of its own: remeshing
or repairing a mesh at any resolution, keeping open surfaces open.

Recipe:
1. Voxels: the exact voxelisation of the (normalised) mesh at R, dilated by `dilation` voxels so the surface
   can move (`focusing.data.voxelize`).
2. Field: one SDF value (voxel units, s · R) and one deformation per shared corner, α [8], β [12], γ per voxel.
   The SDF starts from the corner TSDF (`focusing.data.tsdf.corner_tsdf`, truncated at 3 voxels); α, β, γ and
   δ start at 0 (uniform weights, undeformed grid).
3. Views: a pool of random cameras around the object, part of them zoomed onto random surface points (paper
   Eq. 4), with GT depth / normal / mask rendered once under no_grad.
4. Steps: Adam on the field; each step extracts the mesh with the training split, renders a few pool views and
   minimises L1 depth (in voxels) + L1 normal + L1 mask + SSIM on normals + λ_tv sparse TV + λ_flex L_flex
   (+ the TSDF warm-up for the first `warmup_fraction` of the steps), the paper's Eq. 3, 5, 6, 7.
5. Export: the inference split (2 triangles per quad), without the faces farther than `trim_voxels` from the
   input (`trim_far_faces`: surface no view sees, which the render loss cannot remove).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from focusing.data.distance import TriangleGrid
from focusing.data.grid import delinearize, linearize, voxel_corners
from focusing.device import resolve_device
from focusing.errors import FocusingError
from focusing.io.mesh import Mesh
from focusing.sparseflex.extract import SparseFlexResult, sparseflex_mesh

FULL_COVERAGE = 1 - 1e-4  # antialiased mask value above which a pixel is not a silhouette blend


CPU_STEPS, CPU_VIEWS_PER_STEP, CPU_VIEW_POOL = 130, 2, 32  # R = 128 in < 2 min on 2 idle cores


@dataclass
class FitConfig:
    """Everything `fit_mesh` can tune; defaults aim at F-score@0.005 >= 0.97 at R = 256 on a GPU
    (`for_device` gives the CPU's)."""

    steps: int = 400
    views_per_step: int = 4
    view_pool: int = 64
    zoom_fraction: float = 0.5  # share of the pool that zooms onto a random surface point
    zoom_size: tuple[float, float] = (0.15, 0.5)  # side of the zoom crop, in NDC units of the full view (2 = all)
    image_size: int = 512
    camera_radius: float = 2.5
    fov_deg: float = 40.0
    dilation: int = 1
    lr_sdf: float = 0.01  # voxel units per step
    lr_deform: float = 0.02
    lr_weights: float = 0.02
    w_depth: float = 1.0  # on depth errors measured in voxels
    w_normal: float = 1.0
    w_mask: float = 1.0
    w_ssim: float = 0.2
    w_tv: float = 1e-3  # paper λ5
    w_flex: float = 0.5
    w_tsdf: float = 1.0  # paper λ6
    warmup_fraction: float = 0.1
    truncation_voxels: float = 3.0
    trim_voxels: float = 1.0  # export: drop faces whose 3 vertices are farther from the input (0: keep all)

    @classmethod
    def for_device(cls, device: str | torch.device | None, resolution: int) -> "FitConfig":
        """The defaults for `device` and R: on a GPU the class defaults; on a CPU, CPU_STEPS steps of
        CPU_VIEWS_PER_STEP views at 2 R pixels (128..512) from a pool of CPU_VIEW_POOL, i.e. two pixels per
        voxel, about 1/8 of the GPU's pixels per step at R = 128 (see docs/BENCHMARKS.md for time and F-score)."""
        if resolve_device(device).type == "cuda":
            return cls()
        return cls(
            steps=CPU_STEPS, views_per_step=CPU_VIEWS_PER_STEP, view_pool=CPU_VIEW_POOL,
            image_size=min(512, max(128, 2 * resolution)),
        )


class SparseFlexField(torch.nn.Module):
    """A SparseFlex field on fixed voxels, parametrised per shared corner (s in voxel units, δ raw) and per voxel
    (raw α, β, γ); `extract` calls `sparseflex_mesh` with the per-voxel layout a decoder head would produce."""

    def __init__(self, coords: torch.Tensor, resolution: int, corner_sdf: torch.Tensor):
        super().__init__()
        self.resolution = resolution
        self.coords = coords
        self.corners, self.voxel_to_corner = voxel_corners(coords)
        n, m = len(coords), len(self.corners)
        self.sdf = torch.nn.Parameter(corner_sdf.float() * resolution)
        self.deform = torch.nn.Parameter(torch.zeros(m, 3, device=coords.device))
        self.alpha = torch.nn.Parameter(torch.zeros(n, 8, device=coords.device))
        self.beta = torch.nn.Parameter(torch.zeros(n, 12, device=coords.device))
        self.gamma = torch.nn.Parameter(torch.zeros(n, device=coords.device))

    def extract(self, training: bool) -> SparseFlexResult:
        v2c = self.voxel_to_corner
        return sparseflex_mesh(
            self.coords, self.resolution, (self.sdf / self.resolution)[v2c], self.deform[v2c],
            self.alpha, self.beta, self.gamma, training=training,
        )


def dilate(coords: torch.Tensor, resolution: int, radius: int = 1) -> torch.Tensor:
    """Voxels [N, 4] plus every voxel within `radius` (Chebyshev) of one, clipped to the grid: [N', 4] sorted."""
    if radius <= 0 or len(coords) == 0:
        return coords
    r = torch.arange(-radius, radius + 1, device=coords.device)
    offsets = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    grown = coords[:, None, :].to(torch.int64).repeat(1, len(offsets), 1)
    grown[:, :, 1:] += offsets
    grown = grown.reshape(-1, 4)
    grown = grown[((grown[:, 1:] >= 0) & (grown[:, 1:] < resolution)).all(1)]
    return delinearize(torch.unique(linearize(grown, resolution)), resolution)


def _view_pool(mesh: Mesh, config: FitConfig, device: torch.device, generator: torch.Generator):
    """Pool cameras (random, part of them zoomed onto random surface points) and their GT renders."""
    from focusing.data.sampling import sample_surface
    from focusing.render import Camera, random_cameras, render_mesh

    n = config.view_pool
    cams = random_cameras(
        n, radius=config.camera_radius, fov_deg=config.fov_deg, resolution=config.image_size,
        generator=generator, device=device,
    )
    n_zoom = int(round(n * config.zoom_fraction))
    if n_zoom:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        points = torch.from_numpy(sample_surface(mesh, n_zoom, seed=seed).points).to(device)
        full = cams[n - n_zoom :]
        ndc, _ = full.project(points[:, None, :])  # [B, 1, 3]: each zoomed view gets its own surface point
        centre = ndc[:, 0, :2]
        lo, hi = config.zoom_size
        half = (lo + (hi - lo) * torch.rand(n_zoom, generator=generator).to(device)) / 2
        bbox = torch.stack([centre[:, 0] - half, centre[:, 0] + half, centre[:, 1] - half, centre[:, 1] + half], 1)
        zoomed = full.zoomed(bbox)
        cams = Camera(
            torch.cat([cams.view[: n - n_zoom], zoomed.view]), torch.cat([cams.proj[: n - n_zoom], zoomed.proj]),
            cams.height, cams.width,
        )
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device)
    faces = torch.as_tensor(mesh.faces, dtype=torch.int64, device=device)
    depth, normal, mask = [], [], []
    with torch.no_grad():
        for i in range(0, n, config.views_per_step):
            out = render_mesh(vertices, faces, cams[i : i + config.views_per_step])
            depth.append(out.depth)
            normal.append(out.normal)
            mask.append(out.mask)
    return cams, torch.cat(depth), torch.cat(normal), torch.cat(mask)


def fit_mesh(
    mesh: Mesh,
    resolution: int,
    *,
    steps: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = False,
    config: FitConfig | None = None,
) -> Mesh:
    """Fit a SparseFlex field at `resolution` to `mesh` (normalised frame) by render loss; returns the mesh
    extracted with the inference split, in the normalised frame. `steps` overrides `config.steps`; the default
    config follows the device and R (`FitConfig.for_device`)."""
    device = resolve_device(device)
    config = config or FitConfig.for_device(device, resolution)
    grid = TriangleGrid(mesh, resolution, device=device)
    field, target = init_field(mesh, resolution, config, device, grid=grid)
    optimize_field(field, target, mesh, config, steps=steps, seed=seed, progress=progress)
    with torch.no_grad():
        out = result_mesh(field.extract(training=False))
    return trim_far_faces(out, mesh, resolution, config.trim_voxels, grid=grid)


def optimize_field(
    field: SparseFlexField,
    target: torch.Tensor,
    mesh: Mesh,
    config: FitConfig,
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> None:
    """Steps 3-4 of the recipe, in place: Adam on `field` against renders of `mesh`; `target` [M] is the
    corner TSDF in voxel units for the warm-up."""
    from tqdm import tqdm

    from focusing import losses
    from focusing.render import render_mesh

    steps = config.steps if steps is None else steps
    device = field.sdf.device
    generator = torch.Generator().manual_seed(seed)
    R = field.resolution
    neighbors = losses.corner_neighbors(field.corners)
    cams, gt_depth, gt_normal, gt_mask = _view_pool(mesh, config, device, generator)
    gt_full = gt_mask >= FULL_COVERAGE

    optim = torch.optim.Adam([
        {"params": [field.sdf], "lr": config.lr_sdf},
        {"params": [field.deform], "lr": config.lr_deform},
        {"params": [field.alpha, field.beta, field.gamma], "lr": config.lr_weights},
    ])
    warmup = int(config.warmup_fraction * steps)
    bar = tqdm(range(steps), desc=f"fit R={R}", disable=not progress, unit="step")
    for step in bar:
        idx = torch.randperm(len(gt_depth), generator=generator)[: config.views_per_step].to(device)
        res = field.extract(training=True)
        loss = config.w_tv * losses.sparse_tv(field.sdf, neighbors) + config.w_flex * losses.flex_loss(res)
        if step < warmup:
            loss = loss + config.w_tsdf * losses.tsdf_loss(field.sdf, target)
        if len(res.faces):
            out = render_mesh(res.vertices.float(), res.faces, cams[idx])
            # depth and normals where both are fully covered (silhouette pixels are blends: the mask's job)
            valid = (out.mask.detach() >= FULL_COVERAGE) & gt_full[idx]
            loss = loss + config.w_depth * R * losses.depth_l1(out.depth, gt_depth[idx], valid)
            loss = loss + config.w_normal * losses.normal_l1(out.normal, gt_normal[idx], valid)
            loss = loss + config.w_mask * losses.mask_l1(out.mask, gt_mask[idx])
            loss = loss + config.w_ssim * losses.normal_ssim(out.normal, gt_normal[idx], out.mask, gt_mask[idx])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}", faces=len(res.faces))


def init_field(mesh: Mesh, resolution: int, config: FitConfig, device: torch.device,
               grid: TriangleGrid | None = None):
    """The starting field (dilated voxels, SDF = corner TSDF) and the TSDF target [M] in voxel units; grid: the
    mesh's `TriangleGrid` at `resolution` on `device`, reused by the TSDF."""
    from focusing.data.tsdf import corner_tsdf
    from focusing.data.voxelize import voxelize, with_batch

    coords = dilate(with_batch(voxelize(mesh, resolution, device=device)), resolution, config.dilation)
    corners, _ = voxel_corners(coords)
    tsdf = corner_tsdf(mesh, corners, resolution, config.truncation_voxels, device=device, grid=grid)
    return SparseFlexField(coords, resolution, tsdf), tsdf * resolution


def trim_far_faces(out: Mesh, mesh: Mesh, resolution: int, voxels: float, *,
                   grid: TriangleGrid | None = None) -> Mesh:
    """`out` without the faces whose three vertices all lie farther than `voxels` voxels (at `resolution`) from
    `mesh`, and without the vertices left unused; both meshes in the normalised frame. voxels <= 0: `out`.

    Such faces are surface that no view sees, so the render loss never moved it and it is not the input's: e.g.
    the start of an open sheet inside a closed part continues past the sheet's rim to the end of the dilated
    voxels (the corner TSDF's known limit). Measured on shrec_truck at R = 256: 2.7% of the faces, F@0.005
    0.928 -> 0.941. Visible surface ends within a fraction of a voxel of the input, and the shell of a part
    thinner than a voxel starts within sqrt(3)/2 voxel of it, so one voxel keeps both. grid: a `TriangleGrid` of
    `mesh` at `resolution` (built on the CPU when not given).
    """
    if voxels <= 0:
        return out
    grid = grid if grid is not None else TriangleGrid(mesh, resolution)
    points = torch.as_tensor((out.vertices + 0.5) * resolution, dtype=torch.float64, device=grid.device)
    far = (grid.distance(points, voxels + 1.0) > voxels).cpu().numpy()
    faces = out.faces[~far[out.faces].all(1)]
    if len(faces) == len(out.faces):
        return out
    if len(faces) == 0:
        raise FocusingError(f"every extracted face lies more than {voxels:g} voxels from the input")
    used, faces = np.unique(faces, return_inverse=True)
    return Mesh(out.vertices[used], faces.reshape(-1, 3))


def result_mesh(res: SparseFlexResult) -> Mesh:
    """A `SparseFlexResult` (batch of one) as a float64 `Mesh` on the CPU."""
    if len(res.faces) == 0:
        raise FocusingError("SparseFlex extraction produced an empty mesh")
    return Mesh(res.vertices.detach().double().cpu().numpy(), res.faces.cpu().numpy())
