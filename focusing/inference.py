"""The VAE as a library: load a checkpoint folder, encode a mesh to a structured latent, decode it to a mesh.

    model = load_vae("checkpoints/focusing-s", device="cuda")
    latent = encode_mesh(model, mesh, resolution=512)        # Latent: SparseTensor [N, 8] at 512 / 4
    save_latent(latent, "shape.safetensors"); latent = load_latent("shape.safetensors")
    out = decode_latent(model, latent)                         # Mesh in the input's units

A mesh is normalised into [-0.5, 0.5]^3 (the `Normalization` travels with the latent, so the decoded mesh comes
back in the input's units), off the voxel planes (`off_grid`: longest side `GRID_FILL`, shifted by `GRID_SHIFT`),
sampled into oriented points (819,200 by default, the anchors' count) and voxelised
exactly at R / 4; the encoder's posterior mean is the latent. Nothing is carved at inference: the decoder
transformer runs on the whole latent, then the upsamplers (pruning by their occupancy logits) and the
SparseFlex head run tile by tile (`decode_tiled`): cubes of `tile` latent voxels with a halo of `HALO` latent
voxels, keeping from each tile only the output voxels whose latent parent lies in its core. The upsamplers'
convolutions reach 1.5 latent voxels, so a halo of 2 makes tiled decoding exactly equal to untiled decoding
while bounding the memory of the fine levels. The mesh is extracted once over all output voxels.
The upsamplers keep the children whose occupancy logit exceeds `keep_logit` (default `KEEP_LOGIT` = 0, p > 0.5).
The surface voxels they miss leave pinholes (focusing-S step 3674 on the bunny at 256: 16,760 boundary edges;
a lower `keep_logit` closes them only with stray surface elsewhere). Hole closing (`close_holes`, on by default)
fills them after the tiles are merged (`focusing.sparseflex.closure`): the tiles also return the pruned children
with a logit above `CANDIDATE_LOGIT`; holes whose voxels' parents the first upsampler pruned get those parents'
children decoded as candidates (`_candidates_under`, exact: the second upsampler runs with its reach of context);
the candidates that fill holes are added with their shared corners pinned to the kept voxels' values, so the rest
of the surface is unchanged (bunny: 1,520 boundary edges left, its open bottom among them).
The model is local (window position embedding), so any R that is a multiple of 4 works, also above the one
it was trained at.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from focusing.data.sampling import DEFAULT_POINTS
from focusing.errors import FocusingError, InputError
from focusing.io.atomic import atomic_path
from focusing.io.mesh import Mesh, Normalization
from focusing.models.upsample import KEEP_LOGIT
from focusing.models.vae import LATENT_FACTOR, DecoderOutput, FocusingVAE, VAEConfig
from focusing.sparse.lookup import dilate_within, find_voxels, occupancy
from focusing.sparse.tensor import SparseTensor, sort_coords
from focusing.sparseflex import closure

HALO = 2  # latent voxels around a tile's core (>= the 1.5-voxel reach of the upsamplers, see the docstring)
DEFAULT_TILE = 64  # latent voxels per tile side (256 output voxels)
CANDIDATE_LOGIT = -2.0  # hole closing may add back a pruned child whose occupancy logit exceeds this (p > 0.12)
GRID_FILL = 0.99  # longest side of the normalised mesh the encoder sees (`off_grid`)
GRID_SHIFT = 0.00117  # and its shift along each axis: 0.30 / 0.60 / 1.20 / 1.80 / 2.40 voxels at R = 256 ... 2048
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


def off_grid(norm: Normalization) -> Normalization:
    """`norm` with the longest side at `GRID_FILL` and the centre shifted by `GRID_SHIFT` (normalised units).

    Plain normalisation puts an axis-aligned face on the bounding box (CAD: nearly always) exactly on a voxel
    plane, and training (random rotations) never shows that case: focusing-S after its 512 stage lost such faces
    (featuretype_block's, idler_riser's base; recall 0.95 / 0.98 -> 1.00 off the planes, docs/TRAINING.md run 7).
    """
    scale = norm.scale * GRID_FILL
    return Normalization(tuple(c - GRID_SHIFT / scale for c in norm.center), scale)


@torch.no_grad()
def encode_mesh(model: FocusingVAE, mesh: Mesh, resolution: int | None = None, *, points: int = DEFAULT_POINTS,
                seed: int = 0, path: str | os.PathLike = "<mesh>", frame: Normalization | None = None) -> Latent:
    """Encode `mesh` (any units) for output resolution R (multiple of 4; default the model's) -> `Latent`.
    `frame`: the normalisation to encode in (default: `off_grid` of the mesh's own; the generator's models train
    on the plain `Normalization.of(mesh)`, so their evaluation encodes in that)."""
    from focusing.data.sampling import sample_surface
    from focusing.data.voxelize import voxelize, with_batch

    resolution = resolution or model.config.resolution
    if resolution < LATENT_FACTOR or resolution % LATENT_FACTOR:
        raise InputError(path, f"resolution must be a positive multiple of {LATENT_FACTOR}, got {resolution}")
    device = _device_of(model)
    norm = frame if frame is not None else off_grid(Normalization.of(mesh, path))
    normed = mesh.transformed(norm.apply)
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


class _Level(NamedTuple):
    """The first upsampler's children at R/2: coords `[M, 4]`, occupancy logits `[M]`, kept `[M]` bool."""

    coords: torch.Tensor
    logits: torch.Tensor
    keep: torch.Tensor


def _coarser(coords: torch.Tensor, factor: int) -> torch.Tensor:
    """`[N, 4]` parents (same batch, xyz // factor) of voxels `coords` `[N, 4]`, row by row."""
    out = coords.clone()
    out[:, 1:] = torch.div(coords[:, 1:], factor, rounding_mode="floor")
    return out


def _cat_sorted(parts: list[DecoderOutput]) -> DecoderOutput:
    """Voxel sets of one grid joined into one, in SparseTensor order (`keep` joined when the parts have it)."""
    coords = torch.cat([p.coords for p in parts])
    order = sort_coords(coords)
    fields = [torch.cat([getattr(p, f) for p in parts])[order] for f in DecoderOutput.FIELDS]
    keep = None if parts[0].keep is None else torch.cat([p.keep for p in parts])[order]
    return DecoderOutput(coords[order], parts[0].resolution, *fields, keep=keep)


@torch.no_grad()
def decode_tiled(model: FocusingVAE, z: SparseTensor, tile: int | None = DEFAULT_TILE,
                 keep_logit: float = KEEP_LOGIT, close_holes: bool = True) -> DecoderOutput:
    """Decode the whole latent `z` (inference: children kept where their occupancy logit > `keep_logit`), the
    fine levels tile by tile (see the module docstring); tile None or >= the grid: in one piece; then, with
    `close_holes`, fill the surface's pinholes (`_close_holes`). Returns the per-voxel SparseFlex parameters at
    R = 4 x latent (sorted coords; `upsample` is left empty when tiled or closed)."""
    device = z.device
    with _autocast(device):
        h = model.decode_features(z)
    candidate_logit = CANDIDATE_LOGIT if close_holes else None
    extent = h.spatial_extent
    if tile is None or tile >= extent:
        with _autocast(device):
            out = model.decode_head(h, keep_logit=keep_logit, candidate_logit=candidate_logit)
        first = out.upsample[0]
        level = _Level(first.children.coords, first.logits, first.keep)
    else:
        cell = torch.div(h.coords[:, 1:], tile, rounding_mode="floor")
        cells = torch.unique(torch.cat([h.coords[:, :1], cell], 1), dim=0)
        parts, levels = [], []
        for c in cells:
            lo = c[1:] * tile
            xyz = h.coords[:, 1:]
            in_halo = (h.coords[:, 0] == c[0]) & ((xyz >= lo - HALO) & (xyz < lo + tile + HALO)).all(1)
            with _autocast(device):
                out = model.decode_head(h.select(in_halo), keep_logit=keep_logit, candidate_logit=candidate_logit)
            parts.append(out.select(_in_core(out.coords, LATENT_FACTOR, lo, tile)))
            first = out.upsample[0]
            core = _in_core(first.children.coords, 2, lo, tile)
            levels.append(_Level(first.children.coords[core], first.logits[core], first.keep[core]))
        out = _cat_sorted(parts)
        level_coords = torch.cat([lv.coords for lv in levels])
        order = sort_coords(level_coords)
        level = _Level(level_coords[order], *(torch.cat([getattr(lv, f) for lv in levels])[order]
                                              for f in ("logits", "keep")))
    return _close_holes(model, h, out, level, keep_logit) if close_holes else out


def _in_core(coords: torch.Tensor, factor: int, lo: torch.Tensor, tile: int) -> torch.Tensor:
    """[N] bool: do voxels `coords` [N, 4] (`factor` x finer than the latent) lie over the tile's core?"""
    parent = torch.div(coords[:, 1:], factor, rounding_mode="floor")
    return ((parent >= lo) & (parent < lo + tile)).all(1)


def _close_holes(model: FocusingVAE, h: SparseTensor, out: DecoderOutput, level: _Level,
                 keep_logit: float) -> DecoderOutput:
    """Fill the pinholes of the kept voxels' surface (`focusing.sparseflex.closure`). `out` holds the kept voxels
    and the candidates at R (`keep` says which); the holes whose voxels' parents the first upsampler pruned get
    those parents' children as candidates too (`_candidates_under`)."""
    holes = closure.hole_voxels(out.coords[out.keep], out.sdf[out.keep])
    found = find_voxels(torch.unique(_coarser(holes, 2), dim=0), level.coords)
    found = found[found >= 0]
    found = found[~level.keep[found] & (level.logits[found] > CANDIDATE_LOGIT)]
    if len(found):
        out = _cat_sorted([out, _candidates_under(model, h, level, found, out.resolution, keep_logit)])
    keep, sdf, deform = closure.close_holes(out.coords, out.sdf, out.deform, out.keep, ~out.keep, holes=holes)
    return replace(out, sdf=sdf, deform=deform, keep=None).select(keep)


def _candidates_under(model: FocusingVAE, h: SparseTensor, level: _Level, found: torch.Tensor, resolution: int,
                      keep_logit: float) -> DecoderOutput:
    """The children (logit > `CANDIDATE_LOGIT`, none kept) of the first upsampler's pruned children
    `level.coords[found]`, decoded as if those were kept too: the second upsampler runs on them and the kept
    children within its reach, whose first-level features come from the latent voxels within the first
    upsampler's reach. The kept voxels' own outputs are not touched."""
    up1, up2 = model.upsample
    added = torch.zeros_like(level.keep)
    added[found] = True
    rows = level.keep | added
    parents, added = level.coords[rows], added[rows]
    context = dilate_within(parents, h.resolution * 2, added, up2.reach)
    latent = dilate_within(h.coords, h.resolution, occupancy(h.coords, _coarser(parents[context], 2)), up1.reach)
    with _autocast(h.device):
        first = up1(h.select(latent), keep_logit=keep_logit)
        second = up2(first.children.select(occupancy(first.children.coords, parents[context])), keep_logit=keep_logit)
        mine = occupancy(_coarser(second.children.coords, 2), parents[added]) & (second.logits > CANDIDATE_LOGIT)
        children = second.children.select(mine)
        fields = model.head(children.feats, resolution)
    return DecoderOutput(children.coords, resolution, *fields, keep=torch.zeros_like(mine[mine]))


@torch.no_grad()
def decode_latent(model: FocusingVAE, latent: Latent, *, tile: int | None = DEFAULT_TILE,
                  keep_logit: float = KEEP_LOGIT, close_holes: bool = True, normalized: bool = False) -> Mesh:
    """The mesh of `latent` at R = 4 x its grid, in the input's units (or the frame the latent lives in)."""
    channels = latent.z.feats.shape[1]
    if channels != model.config.latent_channels:
        raise FocusingError(f"the latent has {channels} channels, the checkpoint's decoder takes "
                            f"{model.config.latent_channels}")
    z = latent.z.to(_device_of(model))
    res = decode_tiled(model, z, tile, keep_logit, close_holes).mesh(training=False)
    if len(res.faces) == 0:
        raise FocusingError("the decoder produced no surface (empty mesh): the latent holds no occupied voxels "
                            "the checkpoint decodes")
    vertices = res.vertices.double().cpu().numpy()
    if not normalized:
        vertices = latent.normalization.invert(vertices)
    return Mesh(vertices, res.faces.cpu().numpy())


def reconstruct_mesh(model: FocusingVAE, mesh: Mesh, resolution: int | None = None, *, points: int = DEFAULT_POINTS,
                     seed: int = 0, tile: int | None = DEFAULT_TILE, keep_logit: float = KEEP_LOGIT,
                     close_holes: bool = True, normalized: bool = False, path: str | os.PathLike = "<mesh>") -> Mesh:
    """Encode then decode `mesh` at R (the VAE's reconstruction), in the input's units, or with `normalized` in
    the input's normalised frame (`focusing.io.normalize`, not the encoder's `off_grid` one)."""
    latent = encode_mesh(model, mesh, resolution, points=points, seed=seed, path=path)
    out = decode_latent(model, latent, tile=tile, keep_logit=keep_logit, close_holes=close_holes)
    return out.transformed(Normalization.of(mesh, path).apply) if normalized else out


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
    "off_grid", "reconstruct_mesh", "save_latent",
]
