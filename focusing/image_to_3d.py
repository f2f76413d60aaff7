"""Image-to-3D as a library (paper §3.5): image -> sparse structure -> structured latent -> the VAE's mesh.

    gen = load_generator("checkpoints/focusing-gen", device="cuda")
    image = load_image("chair.png")                                  # [3, H, W] float32 in [0, 1]
    mesh = generate(gen, image, seed=0)                              # Mesh in [-0.5, 0.5]^3

A generator folder holds four weights folders (each an export of `focusing export`, or a run's checkpoint):
`structure-vae/`, `structure-flow/`, `latent-flow/` and `shape-vae/`. Generation: encode the image for each
flow, sample the structure latent `[1, 8, G, G, G]` from noise (Euler, `SamplerConfig`), decode it with the
structure VAE and keep the cells with logits > 0 (the structure: latent voxels at G = R / 4), sample the
structured latent on those voxels, undo the flows' normalisation and decode with the shape VAE at R = 4 G.
The noise of both stages comes from one generator seeded by `seed`, so a seed gives one mesh. An optional
`sampler.json` in the folder holds the sampler settings the generator was tuned with (`SamplerConfig` fields,
e.g. {"cfg": 3.0}); without it the defaults (TRELLIS's) apply; a caller's sampler overrides both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from focusing.errors import FocusingError, InputError
from focusing.flow import SamplerConfig, euler_sample
from focusing.io.mesh import Mesh, Normalization
from focusing.models.dit import LatentFlow, LatentFlowConfig, StructureFlow, StructureFlowConfig
from focusing.models.structure_vae import StructureVAE, StructureVAEConfig, occupied_coords
from focusing.models.vae import FocusingVAE, VAEConfig
from focusing.sparse.tensor import SparseTensor

PARTS = ("structure-vae", "structure-flow", "latent-flow", "shape-vae")
SAMPLER_FILE = "sampler.json"
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "focusing-gen"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class Generator:
    """The four models of the image-to-3D pipeline, in eval mode on one device."""

    structure_vae: StructureVAE
    structure_flow: StructureFlow
    latent_flow: LatentFlow
    shape_vae: FocusingVAE
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the folder's sampler.json, else the defaults


def load_module(folder: str | os.PathLike, model_cls: type, config_cls: type,
                device: str | torch.device = "cpu") -> nn.Module:
    """`model_cls(config)` with the weights of `folder` (an export or a training checkpoint), eval mode."""
    from focusing.train.checkpoint import load_state_dict_strict, load_weights
    from focusing.train.config import from_dict

    state, config = load_weights(folder)
    model = model_cls(from_dict(config_cls, config, where=f"{folder}: model"))
    load_state_dict_strict(model, state, folder)
    return model.to(device).eval()


def load_structure_vae(folder, device="cpu") -> StructureVAE:
    return load_module(folder, StructureVAE, StructureVAEConfig, device)


def check_structure_pair(vae: StructureVAEConfig, flow: StructureFlowConfig, where) -> None:
    """The structure flow must model the structure VAE's latent: same grid and channels."""
    if (vae.latent_resolution, vae.latent_channels) != (flow.resolution, flow.latent_channels):
        raise InputError(where, f"the structure VAE's latent is {vae.latent_channels} x {vae.latent_resolution}^3, "
                                f"the structure flow's {flow.latent_channels} x {flow.resolution}^3")


def check_latent_pair(vae: VAEConfig, flow: LatentFlowConfig, where) -> None:
    """The latent flow must model the shape VAE's latent channels."""
    if vae.latent_channels != flow.latent_channels:
        raise InputError(where, f"the shape VAE's latent has {vae.latent_channels} channels, the latent flow's "
                                f"{flow.latent_channels}")


def load_generator(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Generator:
    """The generator of `folder` (see the module docstring; None: the shipped one), checked for consistency."""
    from focusing.inference import load_vae

    folder = Path(folder) if folder is not None else SHIPPED
    if not folder.is_dir():
        raise InputError(folder, "no generator folder here" + (" (this install ships none; pass --checkpoint)"
                                                               if folder == SHIPPED else ""))
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise InputError(folder, f"not a generator folder: missing {', '.join(p + '/' for p in missing)} (it holds "
                                 f"{', '.join(p + '/' for p in PARTS)})")
    gen = Generator(load_structure_vae(folder / PARTS[0], device),
                    load_module(folder / PARTS[1], StructureFlow, StructureFlowConfig, device),
                    load_module(folder / PARTS[2], LatentFlow, LatentFlowConfig, device),
                    load_vae(folder / PARTS[3], device), load_sampler(folder))
    check_structure_pair(gen.structure_vae.config, gen.structure_flow.config, folder / PARTS[1])
    check_latent_pair(gen.shape_vae.config, gen.latent_flow.config, folder / PARTS[2])
    return gen


def load_sampler(folder: str | os.PathLike) -> SamplerConfig:
    """The sampler settings of generator `folder` (its sampler.json; the defaults without one). A file that is not
    a JSON object of `SamplerConfig` fields raises InputError."""
    import json

    from focusing.train.config import from_dict

    path = Path(folder) / SAMPLER_FILE
    if not path.is_file():
        return SamplerConfig()
    try:
        return from_dict(SamplerConfig, json.loads(path.read_text()), where=str(path))
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(path, f"not a sampler file: {str(exc).splitlines()[0]}") from None


def sampler_for(gen: Generator, **overrides) -> SamplerConfig:
    """The generator's sampler settings with the given fields replaced (None: keep), validated."""
    import dataclasses

    return dataclasses.replace(gen.sampler, **{k: v for k, v in overrides.items() if v is not None})


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file -> `[3, H, W]` float32 in [0, 1] (RGB; transparency composited on white, the background of
    our renders). A missing, unreadable or non-image file raises InputError."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InputError(path, f"not a readable image (expected {', '.join(IMAGE_SUFFIXES)})") from None
    if rgba.shape[0] < 8 or rgba.shape[1] < 8:
        raise InputError(path, f"image is too small ({rgba.shape[1]} x {rgba.shape[0]} px, need >= 8 x 8)")
    alpha = rgba[..., 3:]
    rgb = rgba[..., :3] * alpha + (1.0 - alpha)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_structure(gen: Generator, image: torch.Tensor, generator: torch.Generator,
                       sampler: SamplerConfig, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """image `[3, H, W]` -> the structure: latent voxels `[N, 4]` int32 (batch 0) at G = the grid of the
    structure VAE's input."""
    flow, device = gen.structure_flow, _device(gen.structure_flow)
    c, g = flow.config.latent_channels, flow.config.resolution
    cond = flow.encode_condition(image[None].to(device))
    noise = torch.randn((1, c, g, g, g), generator=generator, device=generator.device).to(device)
    x = euler_sample(flow, noise, cond, sampler, progress=progress)
    coords = occupied_coords(gen.structure_vae.decode(flow.denormalize(x, 1)))
    if len(coords) == 0:
        raise FocusingError("the generated structure is empty (no occupied cell): try another --seed or --cfg")
    return coords


@torch.no_grad()
def generate_latent(gen: Generator, image: torch.Tensor, coords: torch.Tensor, generator: torch.Generator,
                    sampler: SamplerConfig, progress: Callable[[int], None] | None = None) -> SparseTensor:
    """The structured latent `[N, C]` on the voxels `coords` `[N, 4]` at G, for image `[3, H, W]`."""
    flow, device = gen.latent_flow, _device(gen.latent_flow)
    grid = gen.structure_vae.config.resolution
    structure = SparseTensor(coords.to(device), torch.zeros(len(coords), 0, device=device), batch_size=1,
                             resolution=grid)
    cond = flow.encode_condition(image[None].to(device))
    noise = torch.randn((len(coords), flow.config.latent_channels), generator=generator, device=generator.device)

    def predict(feats, t, c):
        return flow(structure.replace(feats), t, c).feats

    x = euler_sample(predict, noise.to(device), cond, sampler, progress=progress)
    return structure.replace(flow.denormalize(x, 1))


@torch.no_grad()
def sample_latent(gen: Generator, image: torch.Tensor, *, seed: int = 0,
                  structure_sampler: SamplerConfig | None = None, latent_sampler: SamplerConfig | None = None,
                  progress: Callable[[int], None] | None = None) -> SparseTensor:
    """image `[3, H, W]` in [0, 1] -> the structured latent `[N, C]` on the generated structure (its coords,
    `[N, 4]` at G); both stages draw from one generator seeded by `seed`."""
    generator = torch.Generator(device=_device(gen.structure_flow)).manual_seed(seed)
    coords = generate_structure(gen, image, generator, structure_sampler or gen.sampler, progress)
    return generate_latent(gen, image, coords, generator, latent_sampler or gen.sampler, progress)


def decode(gen: Generator, z: SparseTensor, tile: int | None = None) -> Mesh:
    """A structured latent at G (normalised frame) -> the shape VAE's mesh at R = 4 G in [-0.5, 0.5]^3."""
    from focusing.inference import DEFAULT_TILE, Latent, decode_latent

    return decode_latent(gen.shape_vae, Latent(z, Normalization((0.0, 0.0, 0.0), 1.0)), tile=tile or DEFAULT_TILE,
                         normalized=True)


@torch.no_grad()
def generate(gen: Generator, image: torch.Tensor, *, seed: int = 0, structure_sampler: SamplerConfig | None = None,
             latent_sampler: SamplerConfig | None = None, progress: Callable[[int], None] | None = None,
             tile: int | None = None) -> Mesh:
    """image `[3, H, W]` in [0, 1] -> the generated Mesh in the normalised frame [-0.5, 0.5]^3 (see the module
    docstring); `progress(1)` after every sampler step (structure then latent)."""
    z = sample_latent(gen, image, seed=seed, structure_sampler=structure_sampler, latent_sampler=latent_sampler,
                      progress=progress)
    return decode(gen, z, tile)


__all__ = ["Generator", "check_latent_pair", "check_structure_pair", "decode", "generate", "generate_latent",
           "generate_structure", "sample_latent", "load_generator", "load_image", "load_module", "load_sampler",
           "load_structure_vae", "sampler_for"]
