"""Training the image-to-3D generator (paper §3.5) on the VAE's trainer: three experiment kinds, their objectives.

An experiment YAML with `kind:` one of
    structure_vae    the sparse-structure VAE on the occupancy of the latent grid (Dice + BCE + KL)
    structure_flow   the rectified flow over the structure VAE's latent (needs `structure_vae:` weights)
    latent_flow      the rectified flow over the shape VAE's latent voxels (needs `shape_vae:` weights)
is read by `focusing train --config C.yaml` like the VAE's (`focusing.train.experiment`); the sections are
model (the kind's config), data and train (as for the VAE), loss (structure_vae), flow and condition (flows).

Batches come from the VAE's data path (`focusing.data.online`): `voxels_latent` at R/4 (R = train.resolution,
the shape VAE's output resolution) is the structure, the frozen shape VAE's encoder gives the latent (once per
mesh by default, `cache_latents`: `LatentFlowObjective`), and the GT meshes give the condition images: shaded
normal maps (`focusing.render.images.normal_to_rgb`, the colouring of our pictures, white background) rendered
with `focusing.render` from a random camera per item.
Train generators with `data.augment: null`: the generated shape is in the training meshes' own frame, which a
random rotation would make unpredictable from the image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from focusing.data.online import sample_surface_torch
from focusing.data.voxelize import with_batch
from focusing.errors import FocusingError
from focusing.flow import FlowConfig, flow_loss
from focusing.models.dit import LatentFlow, LatentFlowConfig, StructureFlow, StructureFlowConfig
from focusing.models.structure_vae import StructureVAE, StructureVAEConfig, dice_loss, occupancy_grid
from focusing.models.vae import LATENT_FACTOR
from focusing.sparse.tensor import SparseTensor
from focusing.train.config import DataConfig, TrainConfig
from focusing.train.objective import StepResult


@dataclass
class ConditionConfig:
    """Condition images of the training meshes: one random view per item (the paper renders 518^2).

    views: 0 renders a fresh random view of every item at every step; V > 0 renders V random views of each mesh
    once, at its first use (cameras seeded by the mesh id, `mesh_seed`), keeps them as uint8 on the batch's
    device (3 S^2 bytes a view: V = 64 at S = 256 is 12.6 MB a mesh) and draws one of them per item and step,
    as TRELLIS trains on 150 pre-rendered views an object. The images are the same as fresh renders from those
    cameras; what changes is that a step renders nothing once every mesh has been seen.
    """

    image_size: int = 518
    radius: tuple[float, float] = (2.0, 2.0)  # camera distance, uniform in [min, max]
    fov_deg: tuple[float, float] = (40.0, 40.0)  # vertical field of view, uniform in [min, max]
    views: int = 0  # fixed views a mesh (rendered once and kept); 0: a fresh random view at every step

    def __post_init__(self):
        self.radius, self.fov_deg = tuple(self.radius), tuple(self.fov_deg)
        if not 8 <= self.image_size <= 518:
            raise ValueError(f"condition image_size must be in [8, 518], got {self.image_size}")
        if self.views < 0:
            raise ValueError(f"condition views must be >= 0, got {self.views}")


@dataclass
class StructureLossConfig:
    """Weights of the structure VAE's loss (TRELLIS: Dice, KL 1e-3)."""

    dice: float = 1.0
    bce: float = 0.0
    kl: float = 1e-3


def condition_cameras(n: int, cfg: ConditionConfig, generator: torch.Generator) -> list:
    """`n` random cameras (one `Camera` each) looking at the origin; drawn with a CPU generator seeded from
    `generator` (of any device), so a resumed run draws the same ones."""
    from focusing.render import random_cameras

    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    cpu = torch.Generator().manual_seed(seed)
    cams = []
    for _ in range(n):
        radius, fov = (lo + (hi - lo) * float(torch.rand((), generator=cpu)) for lo, hi in (cfg.radius, cfg.fov_deg))
        cams.append(random_cameras(1, radius=radius, fov_deg=fov, resolution=cfg.image_size, generator=cpu))
    return cams


def render_views(vertices: torch.Tensor, faces: torch.Tensor, camera) -> torch.Tensor:
    """The shaded normal maps `[B, 3, S, S]` (uint8) of a mesh (`[V, 3]`, `[F, 3]`) seen by a `camera` of B
    views: `normal_to_rgb` of the render, white background (what `focusing generate` expects)."""
    from focusing.render import render_mesh
    from focusing.render.images import normal_to_rgb

    with torch.no_grad():
        r = render_mesh(vertices.float(), faces, camera)
    rgb = [torch.from_numpy(normal_to_rgb(n, m)) for n, m in zip(r.normal, r.mask)]
    return torch.stack(rgb).permute(0, 3, 1, 2).to(vertices.device)


def render_condition(vertices: torch.Tensor, faces: torch.Tensor, camera) -> torch.Tensor:
    """The shaded normal map `[3, S, S]` in [0, 1] of a mesh seen by a one-view `camera` (`render_views`)."""
    return render_views(vertices, faces, camera)[0].float() / 255.0


def condition_images(vertices: list, faces: list, cfg: ConditionConfig, generator: torch.Generator) -> torch.Tensor:
    """Condition images `[B, 3, S, S]` of the meshes (float `[V, 3]`, int64 `[F, 3]`), one random view each."""
    cams = condition_cameras(len(vertices), cfg, generator)
    return torch.stack([render_condition(v, f, cam) for v, f, cam in zip(vertices, faces, cams)])


class ConditionViews:
    """The condition images of a batch (`ConditionConfig.views`): fresh random views, or one of each mesh's
    fixed views, rendered at the mesh's first use and kept (`cache`: mesh id -> uint8 `[V, 3, S, S]`). The
    fixed views depend on the mesh id alone: the same on every rank and after a resume."""

    def __init__(self, cfg: ConditionConfig):
        self.cfg = cfg
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """`[B, 3, S, S]` in [0, 1] for the batch's meshes (`ids`, `vertices`, `faces`)."""
        if not self.cfg.views:
            return condition_images(batch["vertices"], batch["faces"], self.cfg, generator)
        pick = torch.randint(0, self.cfg.views, (len(batch["ids"]),), generator=generator,
                             device=generator.device).tolist()
        images = []
        for mesh_id, vertices, faces, view in zip(batch["ids"], batch["vertices"], batch["faces"], pick):
            if mesh_id not in self.cache:
                self.cache[mesh_id] = self.fixed_views(mesh_id, vertices, faces)
            images.append(self.cache[mesh_id][view])
        return torch.stack(images).float() / 255.0

    def fixed_views(self, mesh_id: str, vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """uint8 `[V, 3, S, S]`: the mesh's V views from cameras drawn with a generator seeded by its id, in one
        render call."""
        from focusing.render import Camera

        cams = condition_cameras(self.cfg.views, self.cfg, torch.Generator().manual_seed(mesh_seed(mesh_id)))
        return render_views(vertices, faces, Camera.cat(cams))


def _structure(batch: dict) -> torch.Tensor:
    """The batch's occupancy of the latent grid, `[B, 1, R/4, R/4, R/4]`."""
    return occupancy_grid(batch["voxels_latent"], len(batch["ids"]), int(batch["resolution"]) // LATENT_FACTOR)


def _check_grid(what: str, grid: int, batch: dict) -> None:
    latent = int(batch["resolution"]) // LATENT_FACTOR
    if grid != latent:
        raise FocusingError(f"the {what} works on a {grid}^3 grid, but the batches' latent grid is {latent}^3 "
                            f"(train.resolution {batch['resolution']} / {LATENT_FACTOR}): set train.resolution to "
                            f"{grid * LATENT_FACTOR}")


def _image(images: torch.Tensor) -> dict:
    return {"condition": images[0].permute(1, 2, 0).detach().float().cpu()}


class StructureVAEObjective:
    """Dice (+ BCE) of the decoded occupancy against the batch's latent-grid occupancy, + kl x KL."""

    def __init__(self, loss: StructureLossConfig):
        self.loss = loss

    def __call__(self, model: StructureVAE, batch: dict, *, step: int, generator=None, want_images=False):
        _check_grid("structure VAE", model.config.resolution, batch)
        occ = _structure(batch)
        post = model.encode(occ)
        logits = model.decode(post.sample(generator)).float()
        dice = dice_loss(logits, occ)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, occ)
        kl = post.kl()
        total = self.loss.dice * dice + self.loss.bce * bce + self.loss.kl * kl
        with torch.no_grad():
            pred = logits > 0
            iou = (pred & (occ > 0)).sum() / (pred | (occ > 0)).sum().clamp_min(1)
        logs = {"loss/dice": dice.detach(), "loss/bce": bce.detach(), "loss/kl": kl.detach(), "occupancy/iou": iou,
                "occupancy/voxels": occ.sum() / len(occ)}
        return StepResult(total, logs)


class StructureFlowObjective(nn.Module):
    """The flow loss on the frozen structure VAE's posterior mean of the batch's structure, conditioned on a
    rendered view of each mesh."""

    def __init__(self, flow: FlowConfig, condition: ConditionConfig, structure_vae: StructureVAE):
        super().__init__()
        self.flow, self.condition = flow, ConditionViews(condition)
        self.vae = structure_vae.requires_grad_(False).eval()

    def forward(self, model: StructureFlow, batch: dict, *, step: int, generator=None, want_images=False):
        _check_grid("structure VAE", self.vae.config.resolution, batch)
        with torch.no_grad():
            x0 = self.vae.encode(_structure(batch)).mean.float()
            model.calibrate(x0.transpose(0, 1).flatten(1).T)
        x0 = model.normalize(x0, 1)
        images = self.condition(batch, generator)
        loss, logs = flow_loss(model, x0, model.encode_condition(images), self.flow, generator)
        return StepResult(loss, logs, _image(images) if want_images else None)


class LatentFlowObjective(nn.Module):
    """The flow loss on the frozen shape VAE's posterior mean on the batch's latent voxels, conditioned on a
    rendered view of each mesh.

    cache_points: encode each mesh once and keep its posterior mean (TRELLIS encodes its latents once, before
    training); the encoder's points are then `cache_points` surface samples drawn with a seed derived from the
    mesh id (`mesh_seed`), not the batch's, so a mesh's latent depends on the mesh alone: the same on every rank,
    after a resume and in any batch. Needs batches of fixed-pose meshes (`data.augment: null`). The cache holds
    C floats per latent voxel on the batch's device (8 channels: 32 bytes; a mesh at 64^3 has 2K-50K voxels).
    None: encode the batch's own points at every step.
    """

    def __init__(self, flow: FlowConfig, condition: ConditionConfig, shape_vae: nn.Module,
                 cache_points: int | None = None):
        super().__init__()
        self.flow, self.condition = flow, ConditionViews(condition)
        self.vae = shape_vae.requires_grad_(False).eval()
        self.cache_points = cache_points
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # mesh id -> (coords [n, 3], mean [n, C])

    def forward(self, model: LatentFlow, batch: dict, *, step: int, generator=None, want_images=False):
        z = self.latents(batch)
        with torch.no_grad():
            model.calibrate(z.feats)
        images = self.condition(batch, generator)

        def predict(feats, t, cond):
            return model(z.replace(feats), t, cond).feats

        loss, logs = flow_loss(predict, model.normalize(z.feats, 1), model.encode_condition(images), self.flow,
                               generator, item=z.coords[:, 0])
        logs["voxels/latent"] = len(z)
        return StepResult(loss, logs, _image(images) if want_images else None)

    @torch.no_grad()
    def latents(self, batch: dict) -> SparseTensor:
        """The posterior means (float32) on the batch's latent voxels: encoded now, or from the cache."""
        latent_res = int(batch["resolution"]) // LATENT_FACTOR
        voxels = batch["voxels_latent"]
        if self.cache_points is None:
            z = self.vae.encode(batch["points"], batch["normals"], batch["point_batch"], voxels, latent_res,
                                batch_size=len(batch["ids"])).mean
            return z.replace(z.feats.float())
        parts = []
        for b, mesh_id in enumerate(batch["ids"]):
            if mesh_id not in self.cache:
                own = voxels[voxels[:, 0] == b]
                self.cache[mesh_id] = self._encode_alone(mesh_id, batch["vertices"][b], batch["faces"][b],
                                                         own[:, 1:], latent_res)
            parts.append(self.cache[mesh_id])
        coords = torch.cat([with_batch(c, b) for b, (c, _) in enumerate(parts)])
        return SparseTensor(coords, torch.cat([m for _, m in parts]), batch_size=len(parts), resolution=latent_res)

    def _encode_alone(self, mesh_id: str, vertices, faces, voxels, latent_res: int):
        """(voxels [n, 3], posterior mean [n, C] float32) of one mesh from its own seeded surface samples."""
        generator = torch.Generator(device=vertices.device).manual_seed(mesh_seed(mesh_id))
        points, normals, _ = sample_surface_torch(vertices.double(), faces, self.cache_points, generator)
        z = self.vae.encode(points, normals, None, with_batch(voxels), latent_res, batch_size=1).mean
        return voxels, z.feats.float()


def mesh_seed(mesh_id: str) -> int:
    """A 63-bit seed from a mesh id (sha256), the same in every process and run."""
    return int.from_bytes(hashlib.sha256(mesh_id.encode()).digest()[:8], "little") >> 1


def _source(data: DataConfig, train: TrainConfig, resolution: int, rank: int, world_size: int, device,
            points: int = 0):
    """The batches of a generator model: the latent grid's voxels of each mesh (and `points` surface samples, which
    only the latent flow without a latent cache reads). Each sample is keyed by its stream position, so the
    number of points changes nothing else in a batch."""
    from focusing.data.online import make_source

    return make_source(data.source, resolution=resolution, points=points, batch_size=train.batch_size,
                       rank=rank, world_size=world_size, seed=train.seed, device=device, augment=data.augment,
                       reuse=data.reuse, exclude=data.exclude, latent_only=True)  # no model here looks finer


def _no_augment() -> DataConfig:
    return DataConfig(augment=None)


@dataclass
class StructureVAEExperiment:
    kind: Literal["structure_vae"] = "structure_vae"
    model: StructureVAEConfig = field(default_factory=StructureVAEConfig)
    loss: StructureLossConfig = field(default_factory=StructureLossConfig)
    data: DataConfig = field(default_factory=_no_augment)
    train: TrainConfig = field(default_factory=TrainConfig)

    def build_model(self) -> StructureVAE:
        return StructureVAE(self.model)

    def build_objective(self) -> StructureVAEObjective:
        return StructureVAEObjective(self.loss)

    def build_source(self, resolution, rank, world_size, device, start_step=0):
        return _source(self.data, self.train, resolution, rank, world_size, device)


@dataclass
class StructureFlowExperiment:
    kind: Literal["structure_flow"] = "structure_flow"
    structure_vae: str = ""  # weights folder (export or run checkpoint) of the structure VAE
    model: StructureFlowConfig = field(default_factory=StructureFlowConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    data: DataConfig = field(default_factory=_no_augment)
    train: TrainConfig = field(default_factory=TrainConfig)

    def build_model(self) -> StructureFlow:
        return StructureFlow(self.model)

    def build_objective(self) -> StructureFlowObjective:
        from focusing.image_to_3d import check_structure_pair, load_structure_vae

        vae = load_structure_vae(_required(self.structure_vae, "structure_vae"))
        check_structure_pair(vae.config, self.model, self.structure_vae)
        return StructureFlowObjective(self.flow, self.condition, vae)

    def build_source(self, resolution, rank, world_size, device, start_step=0):
        return _source(self.data, self.train, resolution, rank, world_size, device)


@dataclass
class LatentFlowExperiment:
    kind: Literal["latent_flow"] = "latent_flow"
    shape_vae: str = ""  # weights folder of the shape VAE (`focusing export` of a `focusing train` run)
    cache_latents: bool = True  # encode each mesh once (`LatentFlowObjective`, needs data.augment: null)
    model: LatentFlowConfig = field(default_factory=LatentFlowConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    data: DataConfig = field(default_factory=_no_augment)
    train: TrainConfig = field(default_factory=TrainConfig)

    def build_model(self) -> LatentFlow:
        return LatentFlow(self.model)

    def build_objective(self) -> LatentFlowObjective:
        from focusing.image_to_3d import check_latent_pair
        from focusing.inference import load_vae

        if self.cache_latents and self.data.augment is not None:
            raise FocusingError("cache_latents needs data.augment: null (a mesh in a random pose has another "
                                "latent at every draw); set data.augment: null or cache_latents: false")
        vae = load_vae(_required(self.shape_vae, "shape_vae"))
        check_latent_pair(vae.config, self.model, self.shape_vae)
        return LatentFlowObjective(self.flow, self.condition, vae,
                                   cache_points=self.data.points if self.cache_latents else None)

    def build_source(self, resolution, rank, world_size, device, start_step=0):
        return _source(self.data, self.train, resolution, rank, world_size, device,
                       points=0 if self.cache_latents else self.data.points)  # the cache samples its own


def _required(path: str, key: str) -> str:
    if not path:
        raise FocusingError(f"this experiment needs `{key}:` (a weights folder; --set {key}=FOLDER)")
    return path


EXPERIMENTS = {"structure_vae": StructureVAEExperiment, "structure_flow": StructureFlowExperiment,
               "latent_flow": LatentFlowExperiment}
