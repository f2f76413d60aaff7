"""The VAE as a library: load a checkpoint folder, encode a mesh to a structured latent, decode it to a mesh.

    model = load_vae("checkpoints/focusing-s", device="cuda")
    latent = encode_mesh(model, mesh, resolution=512)        # Latent: SparseTensor [N, 8] at 512 / 4
    save_latent(latent, "shape.safetensors"); latent = load_latent("shape.safetensors")
    out = decode_latent(model, latent)                         # Mesh in the input's units

A mesh is normalised into [-0.5, 0.5]^3 (the `Normalization` travels with the latent, so the decoded mesh comes
back in the input's units), sampled into oriented points (819,200 by default, the anchors' count) and voxelised
exactly at R / 4; the encoder's posterior mean is the latent. Nothing is carved at inference: the decoder
transformer runs on the whole latent, then the upsamplers (pruning by their occupancy logits) and the
SparseFlex head run tile by tile (`decode_tiled`): cubes of `tile` latent voxels with a halo of `HALO` latent
voxels, keeping from each tile only the output voxels whose latent parent lies in its core. The upsamplers'
convolutions reach 1.5 latent voxels, so a halo of 2 makes tiled decoding exactly equal to untiled decoding
while bounding the memory of the fine levels. The mesh is extracted once over all output voxels.
The upsamplers keep the children whose occupancy logit exceeds `keep_logit` (default `KEEP_LOGIT` = 0, p > 0.5).
The voxels they miss leave pinholes (focusing-S step 3674 on the bunny at 256: 16,760 boundary edges); -1
(p > 0.27) closes most of them (2,620) but adds stray surface on thin, open and many-part shapes, and scored lower
on the validation meshes (docs/TRAINING.md).
The model is local (window position embedding), so any R that is a multiple of 4 works, also above the one
it was trained at.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from focusing.data.sampling import DEFAULT_POINTS
from focusing.errors import FocusingError, InputError
from focusing.io.atomic import atomic_path
from focusing.io.mesh import Mesh, Normalization, normalize
from focusing.models.upsample import KEEP_LOGIT
from focusing.models.vae import LATENT_FACTOR, DecoderOutput, FocusingVAE, VAEConfig
from focusing.sparse.tensor import SparseTensor, sort_coords

HALO = 2  # latent voxels around a tile's core (>= the 1.5-voxel reach of the upsamplers, see the docstring)
DEFAULT_TILE = 64  # latent voxels per tile side (256 output voxels)
LATENT_KEY = "focusing_latent"
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "focusing-s"
"""The shipped checkpoint folder of a source checkout / editable install (used when no checkpoint is given)."""


@dataclass
class Latent:
    """A structured latent: z (SparseTensor `[N, C]`, batch 0, at `z.resolution` = R / 4) and the normalisation
    mapping the normalised frame back to the input's units."""

    z: SparseTensor
    normalization: Normalization

    @property
    def output_resolution(self) -> int:
        return self.z.resolution * LATENT_FACTOR


def default_checkpoint() -> Path:
    """The shipped checkpoint folder, or a clear error when this install has none."""
    from focusing.train.checkpoint import WEIGHTS_JSON

    if not (SHIPPED / WEIGHTS_JSON).is_file():
        raise FocusingError(f"no shipped checkpoint at {SHIPPED}; pass --checkpoint FOLDER")
    return SHIPPED


def load_vae(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FocusingVAE:
    """A `FocusingVAE` in eval mode from a weights folder (`focusing.train.checkpoint.export_weights`) or a
    training checkpoint; None: the shipped one. Weights that do not fit their config fail with one line."""
    from focusing.train.checkpoint import load_state_dict_strict, load_weights
    from focusing.train.config import from_dict

    folder = Path(folder) if folder is not None else default_checkpoint()
    state, config = load_weights(folder)
    model = FocusingVAE(from_dict(VAEConfig, config, where=f"{folder}: model"))
    load_state_dict_strict(model, state, folder)
    return model.to(device).eval()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_mesh(model: FocusingVAE, mesh: Mesh, resolution: int | None = None, *, points: int = DEFAULT_POINTS,
                seed: int = 0, path: str | os.PathLike = "<mesh>") -> Latent:
    """Encode `mesh` (any units) for output resolution R (multiple of 4; default the model's) -> `Latent`."""
    from focusing.data.sampling import sample_surface
    from focusing.data.voxelize import voxelize, with_batch

    resolution = resolution or model.config.resolution
    if resolution < LATENT_FACTOR or resolution % LATENT_FACTOR:
        raise InputError(path, f"resolution must be a positive multiple of {LATENT_FACTOR}, got {resolution}")
    device = _device_of(model)
    normed, norm = normalize(mesh, path)
    samples = sample_surface(normed, points, seed=seed)
    latent_res = resolution // LATENT_FACTOR
    coords = with_batch(voxelize(normed, latent_res, device=device))
    pts = torch.from_numpy(samples.points).to(device)
    nrm = torch.from_numpy(samples.normals).to(device)
    with _autocast(device):
        post = model.encode(pts, nrm, None, coords, latent_res, batch_size=1)
    return Latent(post.mean, norm)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def decode_tiled(model: FocusingVAE, z: SparseTensor, tile: int | None = DEFAULT_TILE,
                 keep_logit: float = KEEP_LOGIT) -> DecoderOutput:
    """Decode the whole latent `z` (inference: children kept where their occupancy logit > `keep_logit`), the
    fine levels tile by tile (see the module docstring); tile None or >= the grid: in one piece. Returns the
    per-voxel SparseFlex parameters at R = 4 x latent (sorted coords; `upsample` is left empty)."""
    device = z.device
    with _autocast(device):
        h = model.decode_features(z)
    extent = h.spatial_extent
    if tile is None or tile >= extent:
        with _autocast(device):
            out = model.decode_head(h, keep_logit=keep_logit)
        return out
    cell = torch.div(h.coords[:, 1:], tile, rounding_mode="floor")
    cells = torch.unique(torch.cat([h.coords[:, :1], cell], 1), dim=0)
    parts = []
    for c in cells:
        lo = c[1:] * tile
        xyz = h.coords[:, 1:]
        in_halo = (h.coords[:, 0] == c[0]) & ((xyz >= lo - HALO) & (xyz < lo + tile + HALO)).all(1)
        with _autocast(device):
            out = model.decode_head(h.select(in_halo), keep_logit=keep_logit)
        parent = torch.div(out.coords[:, 1:], LATENT_FACTOR, rounding_mode="floor")
        core = ((parent >= lo) & (parent < lo + tile)).all(1)
        parts.append((out, core))
    coords = torch.cat([o.coords[k] for o, k in parts])
    order = sort_coords(coords)
    fields = {name: torch.cat([getattr(o, name)[k] for o, k in parts])[order]
              for name in ("sdf", "deform", "alpha", "beta", "gamma")}
    return DecoderOutput(coords[order], z.resolution * LATENT_FACTOR, **fields)


@torch.no_grad()
def decode_latent(model: FocusingVAE, latent: Latent, *, tile: int | None = DEFAULT_TILE,
                  keep_logit: float = KEEP_LOGIT, normalized: bool = False) -> Mesh:
    """The mesh of `latent` at R = 4 x its grid, in the input's units (or the normalised frame)."""
    channels = latent.z.feats.shape[1]
    if channels != model.config.latent_channels:
        raise FocusingError(f"the latent has {channels} channels, the checkpoint's decoder takes "
                            f"{model.config.latent_channels}")
    z = latent.z.to(_device_of(model))
    res = decode_tiled(model, z, tile, keep_logit).mesh(training=False)
    if len(res.faces) == 0:
        raise FocusingError("the decoder produced no surface (empty mesh): the latent holds no occupied voxels "
                            "the checkpoint decodes")
    vertices = res.vertices.double().cpu().numpy()
    if not normalized:
        vertices = latent.normalization.invert(vertices)
    return Mesh(vertices, res.faces.cpu().numpy())


def reconstruct_mesh(model: FocusingVAE, mesh: Mesh, resolution: int | None = None, *, points: int = DEFAULT_POINTS,
                     seed: int = 0, tile: int | None = DEFAULT_TILE, keep_logit: float = KEEP_LOGIT,
                     normalized: bool = False, path: str | os.PathLike = "<mesh>") -> Mesh:
    """Encode then decode `mesh` at R (the VAE's reconstruction), in the input's units unless `normalized`."""
    latent = encode_mesh(model, mesh, resolution, points=points, seed=seed, path=path)
    return decode_latent(model, latent, tile=tile, keep_logit=keep_logit, normalized=normalized)


def save_latent(latent: Latent, path: str | os.PathLike) -> None:
    """Write `latent` as safetensors: coords int32 [N, 4], feats float32 [N, C], metadata JSON (atomic)."""
    from safetensors.torch import save

    meta = {"resolution": latent.z.resolution, "center": list(latent.normalization.center),
            "scale": latent.normalization.scale}
    data = save({"coords": latent.z.coords.cpu().contiguous(), "feats": latent.z.feats.float().cpu().contiguous()},
                metadata={LATENT_KEY: json.dumps(meta)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_latent(path: str | os.PathLike) -> Latent:
    """Read a latent written by `save_latent`; a file that is not one fails with one line naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[LATENT_KEY])
            coords, feats = f.get_tensor("coords"), f.get_tensor("feats")
    except Exception:
        raise InputError(path, "not a focusing latent (expected safetensors with coords, feats and "
                               f"'{LATENT_KEY}' metadata, as written by `focusing encode`)") from None
    if coords.dtype != torch.int32 or coords.dim() != 2 or coords.shape[1] != 4 or len(feats) != len(coords):
        raise InputError(path, f"latent has coords {tuple(coords.shape)} {coords.dtype} and feats {tuple(feats.shape)}")
    z = SparseTensor(coords, feats, batch_size=1, resolution=int(meta["resolution"]))
    return Latent(z, Normalization(tuple(float(c) for c in meta["center"]), float(meta["scale"])))


__all__ = [
    "Latent", "decode_latent", "decode_tiled", "default_checkpoint", "encode_mesh", "load_latent", "load_vae",
    "reconstruct_mesh", "save_latent",
]
