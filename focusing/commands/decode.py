"""`focusing decode latent.safetensors -o mesh.ply`: the mesh of a latent written by `focusing encode`."""

from __future__ import annotations

import argparse

from focusing.commands import vae_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decode",
        help="decode a latent written by `focusing encode` into a mesh",
        description="Decodes the whole latent at R = 4 x its grid (tile by tile), pruning by the occupancy "
        "heads, and extracts the SparseFlex mesh, in the units of the mesh it was encoded from.",
    )
    p.add_argument("latent", help="latent file (.safetensors from `focusing encode`)")
    p.add_argument("-o", "--output", required=True, type=vae_args.mesh_output,
                   help="output mesh file (.obj, .ply, .glb)")
    vae_args.add_model_args(p)
    vae_args.add_decode_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from focusing.inference import decode_latent, load_latent
    from focusing.io import save_mesh

    latent = load_latent(args.latent)
    model = vae_args.load_model(args)
    out = decode_latent(model, latent, **vae_args.decode_options(args))
    save_mesh(out, args.output)
    print(f"wrote {args.output}: {len(out.vertices):,} vertices, {len(out.faces):,} faces "
          f"(R = {latent.output_resolution})")
    return 0
