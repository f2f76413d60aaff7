"""Options shared by the VAE commands (`reconstruct`, `encode`, `decode`): checkpoint, device, R, tiles.

Not a command itself (no `register`)."""

from __future__ import annotations

import argparse

from focusing.commands.checks import device, int_at_least, non_negative_int, output_file, positive_int
from focusing.data.sampling import DEFAULT_POINTS
from focusing.io.mesh import SAVE_FORMATS

mesh_output = output_file(SAVE_FORMATS)
latent_output = output_file((".safetensors",))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", default=None,
                   help="checkpoint folder (weights .safetensors + config); default: the shipped focusing-s")
    p.add_argument("--device", type=device, default="auto",
                   help="torch device (default: cuda when available, else cpu)")


def add_encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", "-r", type=int_at_least(4), default=None,
                   help="output resolution R, a multiple of 4 (default: the checkpoint's training R)")
    p.add_argument("--points", type=positive_int, default=DEFAULT_POINTS,
                   help=f"oriented surface points given to the encoder (default {DEFAULT_POINTS:,})")
    p.add_argument("--seed", type=int, default=0, help="seed of the surface sampling")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=non_negative_int, default=None,
                   help="latent voxels per tile side for the fine levels (default 64, i.e. 256 output voxels; "
                   "0: no tiling)")
    p.add_argument("--keep-logit", type=float, default=None,
                   help="the upsamplers keep the children whose occupancy logit exceeds this (default 0, i.e. "
                   "p > 0.5)")
    p.add_argument("--no-close-holes", dest="close_holes", action="store_false",
                   help="leave the pinholes where the upsamplers pruned a surface voxel (default: fill holes of up "
                   "to 8 voxels from the pruned children; open boundaries stay open)")
    p.add_argument("--normalized", action="store_true", help="write the mesh in the [-0.5, 0.5]^3 frame")


def decode_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `focusing.inference.decode_latent` that the decode options give."""
    return dict(tile=args.tile, keep_logit=args.keep_logit, close_holes=args.close_holes, normalized=args.normalized)


def load_model(args: argparse.Namespace):
    from focusing.inference import DEFAULT_TILE, KEEP_LOGIT, load_vae

    if hasattr(args, "tile"):
        args.tile = DEFAULT_TILE if args.tile is None else (args.tile or None)
    if getattr(args, "keep_logit", 0.0) is None:
        args.keep_logit = KEEP_LOGIT
    return load_vae(args.checkpoint, device=args.device)


def encode_input(args: argparse.Namespace):
    """(model, latent) of `args.mesh` at `--resolution` (default: the checkpoint's) with `--points` / `--seed`."""
    from focusing.errors import InputError
    from focusing.inference import encode_mesh
    from focusing.io import load_mesh

    model = load_model(args)
    mesh = load_mesh(args.mesh)
    r = args.resolution or model.config.resolution
    if r % 4:
        raise InputError(args.mesh, f"--resolution must be a multiple of 4, got {r}")
    return model, encode_mesh(model, mesh, r, points=args.points, seed=args.seed, path=args.mesh)
