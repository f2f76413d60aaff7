"""`focusing generate IMAGE -o OUT [--checkpoint C] [--seed S] [--steps N] [--cfg W]`: a mesh from one image."""

from __future__ import annotations

import argparse

from focusing.commands.checks import device, finite_float, int_at_least, output_file, positive_int
from focusing.io.mesh import SAVE_FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a mesh from an image (sparse-structure flow -> structured-latent flow -> VAE decoder)",
        description="Encodes the image, samples the sparse structure with the structure flow and its VAE, samples "
        "the structured latent on it with the latent flow and decodes it with the shape VAE. Both flows use an "
        "Euler sampler on a rescaled time grid with classifier-free guidance on t in [0.5, 1]. The mesh is written "
        "in the [-0.5, 0.5]^3 frame. Condition images work best as the models were trained: a shaded normal "
        "render of an object on a white background (e.g. `focusing render`). Without --checkpoint the shipped "
        "generator is used.",
    )
    p.add_argument("image", help="condition image (PNG, JPEG, WebP, ...; transparency is composited on white)")
    p.add_argument("-o", "--output", required=True, type=output_file(SAVE_FORMATS),
                   help=f"output mesh file ({', '.join(SAVE_FORMATS)})")
    p.add_argument("--checkpoint", "-c", default=None,
                   help="generator folder holding structure-vae/, structure-flow/, latent-flow/ and shape-vae/ "
                   "(weights folders of `focusing export`); default: the shipped one")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="Euler steps of each flow (default: the generator's sampler.json, else 25)")
    p.add_argument("--cfg", type=finite_float, default=None,
                   help="classifier-free guidance weight w, v = v_uncond + w (v_cond - v_uncond); 1 = no guidance "
                   "(default: the generator's sampler.json, else 6, TRELLIS's cfg_strength 5; the shipped "
                   "generator's is 1)")
    p.add_argument("--rescale-t", type=finite_float, default=None,
                   help="time-grid rescaling (default: the generator's sampler.json, else 3)")
    p.add_argument("--device", type=device, default="auto", help="torch device (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from focusing.errors import FocusingError
    from focusing.image_to_3d import generate, load_generator, load_image, sampler_for
    from focusing.io import save_mesh

    image = load_image(args.image)  # before loading the models: a bad image fails at once
    gen = load_generator(args.checkpoint, device=args.device)
    try:
        sampler = sampler_for(gen, steps=args.steps, rescale_t=args.rescale_t, cfg=args.cfg)
    except ValueError as exc:  # SamplerConfig's own checks
        raise FocusingError(str(exc)) from None
    with tqdm(total=2 * sampler.steps, desc="generate", disable=args.quiet, file=sys.stderr,
              dynamic_ncols=True) as bar:
        mesh = generate(gen, image, seed=args.seed, structure_sampler=sampler, latent_sampler=sampler,
                        progress=bar.update)
    save_mesh(mesh, args.output)
    print(f"wrote {args.output}: {len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces (seed {args.seed})")
    return 0
