"""One VAE training step's loss (paper §3.2-3.4, Eq. 7): encode every latent voxel, carve and zoom, decode only
the selected voxels, render prediction and GT with the same (zoomed) camera, combine the losses.

    objective = VAEObjective(LossConfig(), ViewConfig())
    result = objective(model, batch, step=step, generator=g, want_images=True)
    result.loss.backward()

`batch` is the dict of `focusing.data.online` (points, normals, point_batch, voxels_latent / voxels_mid /
voxels at R/4, R/2, R, GT meshes; optionally corners + tsdf for the warm-up). One random camera per item:
the GT depth without antialiasing (background +inf) drives the carving (`focusing.carving`), the adaptive zoom
narrows the camera to [Nmin, Nmax] latent voxels, and the decoder sees only those (children pruned by the GT
occupancy). Logged per step: every loss term, and the voxel counts of each stage (latent, selected, R/2, R).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from focusing import losses
from focusing.carving import gt_depth_for_carving, select_voxels
from focusing.losses import LossConfig
from focusing.models.vae import LATENT_FACTOR, FocusingVAE
from focusing.render import Camera, random_cameras, render_mesh
from focusing.render.renderer import RenderOutput
from focusing.sparse.lookup import find_voxels

SELECTIONS = ("none", "frustum", "carve")


@dataclass
class ViewConfig:
    """Training cameras and voxel selection (paper §3.2, §3.3; the paper renders 518^2 with s = 1.1)."""

    image_size: int = 518
    radius: tuple[float, float] = (2.0, 2.0)  # camera distance to the origin, uniform in [min, max]
    fov_deg: tuple[float, float] = (40.0, 40.0)  # vertical field of view, uniform in [min, max]
    near: float = 0.1
    far: float = 10.0
    selection: str = "carve"  # "none" | "frustum" (TripoSF's sectional training) | "carve" (§3.2)
    carve_r_voxels: float = 2.0  # carving threshold r = this / R (the paper: r = 2 / R)
    zoom: bool = True  # adaptive zooming (§3.3)
    zoom_voxels: tuple[int, int] = (2000, 8000)  # [Nmin, Nmax] latent voxels kept by the zoom
    zoom_s: float = 1.1  # Eq. 4 scale

    def __post_init__(self):
        self.radius, self.fov_deg, self.zoom_voxels = tuple(self.radius), tuple(self.fov_deg), tuple(self.zoom_voxels)
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.zoom_voxels[0] < 1 or self.zoom_voxels[1] < self.zoom_voxels[0]:
            raise ValueError(f"zoom_voxels must be 1 <= Nmin <= Nmax, got {self.zoom_voxels}")


@dataclass
class StepResult:
    """loss: scalar with grad; logs: scalars (0-dim tensors or floats); images: name -> [H, W, 3] in [0, 1]."""

    loss: torch.Tensor
    logs: dict = field(default_factory=dict)
    images: dict | None = None


def _uniform(lo_hi: tuple[float, float], generator: torch.Generator | None) -> float:
    lo, hi = lo_hi
    device = generator.device if generator is not None else None  # the trainer's generator is on the GPU
    return lo + (hi - lo) * float(torch.rand((), generator=generator, device=device))


def _cat_renders(outs: list[RenderOutput]) -> RenderOutput:
    return RenderOutput(*(torch.cat([getattr(o, k) for o in outs]) for k in ("depth", "normal", "mask", "tri_id")))


class VAEObjective:
    """Callable computing one step's loss for a `FocusingVAE` (see the module docstring)."""

    def __init__(self, loss: LossConfig | None = None, views: ViewConfig | None = None):
        self.loss_cfg = loss or LossConfig()
        self.views = views or ViewConfig()
        self.lpips = None
        if self.loss_cfg.lpips and self.loss_cfg.lpips_weights:
            self.lpips = losses.LPIPS(self.loss_cfg.lpips_weights)

    def cameras(self, n: int, generator: torch.Generator | None, device) -> Camera:
        """`n` random cameras (one per batch item) looking at the origin."""
        v = self.views
        cams = [
            random_cameras(1, radius=_uniform(v.radius, generator), fov_deg=_uniform(v.fov_deg, generator),
                           resolution=v.image_size, near=v.near, far=v.far, generator=generator, device=device)
            for _ in range(n)
        ]
        return Camera.cat(cams)

    def __call__(self, model: FocusingVAE, batch: dict, *, step: int, generator: torch.Generator | None = None,
                 want_images: bool = False) -> StepResult:
        R = int(batch["resolution"])
        latent_res = R // LATENT_FACTOR
        meshes = list(zip(batch["vertices"], batch["faces"]))
        n_items = len(meshes)
        device = batch["points"].device
        if self.lpips is not None:
            self.lpips.to(device)

        posterior = model.encode(batch["points"], batch["normals"], batch["point_batch"], batch["voxels_latent"],
                                 latent_res, batch_size=n_items)
        z = posterior.sample(generator)
        with torch.autocast(device.type, enabled=False):  # cameras, carving, zoom: float32 geometry
            sel = self.select(z.coords, latent_res, R, meshes, generator, device)
        decoded = model.decode(z.select(sel.keep), targets=(batch["voxels_mid"], batch["voxels"]))
        with torch.autocast(device.type, enabled=False):  # extraction, renders and losses in float32
            return self._render_and_score(batch, step, posterior, decoded, sel, meshes, R, want_images)

    def select(self, coords, latent_res: int, R: int, meshes, generator, device):
        """One random camera per item, the GT depth for carving, and `focusing.carving.select_voxels`."""
        v = self.views
        cams = self.cameras(len(meshes), generator, device)
        depth_map = None
        if v.selection == "carve" or v.zoom:  # the zoom is always chosen on the carved set (focusing.carving)
            with torch.no_grad():
                depth_map = torch.cat([gt_depth_for_carving(vert, face, cams[b])
                                       for b, (vert, face) in enumerate(meshes)])
        return select_voxels(
            coords, latent_res, cams, mode=v.selection, zoom=v.zoom, depth_map=depth_map,
            r=v.carve_r_voxels / R, n_range=v.zoom_voxels, s=v.zoom_s, generator=generator,
        )

    def _render_and_score(self, batch, step, posterior, decoded, sel, meshes, R, want_images) -> StepResult:
        cfg = self.loss_cfg
        result = decoded.mesh(training=True)

        pred, gt = [], []
        for b, (vert, face) in enumerate(meshes):
            cam = sel.camera[b]
            with torch.no_grad():
                gt.append(render_mesh(vert, face, cam))
            pv, pf = result.mesh(b)
            pred.append(render_mesh(pv, pf, cam))
        pred, gt = _cat_renders(pred), _cat_renders(gt)

        tsdf_target = self._tsdf_target(batch, result, meshes, R) if step < cfg.tsdf_steps and cfg.tsdf else None
        total, terms = losses.vae_loss(cfg, pred=pred, gt=gt, result=result, decoded=decoded, posterior=posterior,
                                       tsdf_target=tsdf_target, lpips=self.lpips)
        logs = {f"loss/{k}": t.detach() for k, t in terms.items()}
        logs.update({f"voxels/{k}": n for k, n in sel.stats.items()})
        logs.update({
            "voxels/decoded_latent": int(sel.keep.sum()),
            "voxels/mid": len(decoded.upsample[0].x),
            "voxels/full": len(decoded.coords),
            "mesh/faces": len(result.faces),
        })
        images = None
        if want_images:
            from focusing.render.images import normal_to_rgb

            images = {
                name: torch.from_numpy(normal_to_rgb(r.normal[0], r.mask[0])).float() / 255.0
                for name, r in (("gt_normal", gt), ("pred_normal", pred))
            }
        return StepResult(total, logs, images)

    def _tsdf_target(self, batch: dict, result, meshes, R: int) -> torch.Tensor:
        """The TSDF (normalised units) at the decoded corners: looked up in the batch's `corners` / `tsdf` when
        the data path provides them (decoded voxels are GT voxels in training, so every corner is there), else
        computed on the device from the GT meshes."""
        if "corners" in batch and "tsdf" in batch:
            idx = find_voxels(result.corners, batch["corners"])
            if bool((idx >= 0).all()):
                return batch["tsdf"][idx]
        from focusing.data.tsdf import corner_tsdf
        from focusing.io.mesh import Mesh

        target = torch.empty(len(result.corners), device=result.corners.device)
        for b, (vert, face) in enumerate(meshes):
            rows = result.corners[:, 0] == b
            mesh = Mesh(vert.detach().double().cpu().numpy(), face.cpu().numpy())
            target[rows] = corner_tsdf(mesh, result.corners[rows, 1:], R, self.loss_cfg.tsdf_truncation_voxels,
                                       device=result.corners.device)
        return target
