"""Options shared by the VAE commands (`reconstruct`, `encode`, `decode`): checkpoint, device, R, tiles.

Not a command itself (no `register`)."""

from __future__ import annotations

import argparse

from focusing.data.sampling import DEFAULT_POINTS


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", default=None,
                   help="checkpoint folder (weights .safetensors + config); default: the shipped focusing-s")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")


def add_encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", "-r", type=int, default=None,
                   help="output resolution R, a multiple of 4 (default: the checkpoint's training R)")
    p.add_argument("--points", type=int, default=DEFAULT_POINTS,
                   help=f"oriented surface points given to the encoder (default {DEFAULT_POINTS:,})")
    p.add_argument("--seed", type=int, default=0, help="seed of the surface sampling")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=int, default=None,
                   help="latent voxels per tile side for the fine levels (default 64, i.e. 256 output voxels; "
                   "0: no tiling)")
    p.add_argument("--normalized", action="store_true", help="write the mesh in the [-0.5, 0.5]^3 frame")


def check_output_mesh(path: str) -> None:
    from focusing.errors import InputError
    from focusing.io.mesh import SAVE_FORMATS

    if not path.lower().endswith(SAVE_FORMATS):
        raise InputError(path, f"cannot save this format (supported: {', '.join(SAVE_FORMATS)})")


def load_model(args: argparse.Namespace):
    from focusing.device import resolve_device
    from focusing.inference import DEFAULT_TILE, load_vae

    if hasattr(args, "tile"):
        args.tile = DEFAULT_TILE if args.tile is None else (args.tile or None)
    return load_vae(args.checkpoint, device=resolve_device(args.device))


def resolution(args: argparse.Namespace, model, path: str) -> int:
    from focusing.errors import InputError

    r = args.resolution or model.config.resolution
    if r < 4 or r % 4:
        raise InputError(path, f"--resolution must be a positive multiple of 4, got {r}")
    return r
