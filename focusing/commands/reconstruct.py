"""`focusing reconstruct MESH -o OUT`: encode a mesh with the VAE and decode it at resolution R."""

from __future__ import annotations

import argparse

from focusing.commands import vae_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reconstruct",
        help="reconstruct a mesh through the VAE (encode to the sparse latent, decode at resolution R)",
        description="Normalises the mesh into [-0.5, 0.5]^3, samples oriented surface points, encodes them on the "
        "exact latent voxels at R/4 and decodes the whole latent at R (tile by tile, so memory stays bounded); "
        "the output is in the input's units. Without --checkpoint the shipped checkpoint is used.",
    )
    p.add_argument("mesh", help="input mesh file (OBJ, PLY, STL, OFF, GLB, GLTF)")
    p.add_argument("-o", "--output", required=True, type=vae_args.mesh_output,
                   help="output mesh file (.obj, .ply, .glb)")
    vae_args.add_model_args(p)
    vae_args.add_encode_args(p)
    vae_args.add_decode_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from focusing.inference import decode_latent
    from focusing.io import save_mesh

    model, latent = vae_args.encode_input(args)
    out = decode_latent(model, latent, **vae_args.decode_options(args))
    save_mesh(out, args.output)
    print(f"wrote {args.output}: {len(out.vertices):,} vertices, {len(out.faces):,} faces "
          f"(R = {latent.output_resolution}, {len(latent.z):,} latent voxels)")
    return 0
