"""`focusing encode MESH -o latent.safetensors`: the VAE's structured latent of a mesh."""

from __future__ import annotations

import argparse

from focusing.commands import vae_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="encode a mesh into the VAE's sparse latent (a .safetensors file)",
        description="Writes the posterior mean on the exact latent voxels at R/4 (coords int32 [N, 4], feats "
        "float32 [N, 8]) and the normalisation that maps the decoded mesh back to the input's units.",
    )
    p.add_argument("mesh", help="input mesh file (OBJ, PLY, STL, OFF, GLB, GLTF)")
    p.add_argument("-o", "--output", required=True, type=vae_args.latent_output,
                   help="output latent file (.safetensors)")
    vae_args.add_model_args(p)
    vae_args.add_encode_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from focusing.inference import save_latent

    _, latent = vae_args.encode_input(args)
    save_latent(latent, args.output)
    print(f"wrote {args.output}: {len(latent.z):,} latent voxels x {latent.z.feats.shape[1]} channels at "
          f"{latent.z.resolution}^3 (decodes at R = {latent.output_resolution})")
    return 0
