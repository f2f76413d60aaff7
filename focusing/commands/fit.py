"""`focusing fit MESH --resolution R -o OUT`: fit a SparseFlex field to a mesh by render loss and export it."""

from __future__ import annotations

import argparse

from focusing.commands.checks import device, int_at_least, non_negative_int, output_file, positive_int
from focusing.io.mesh import SAVE_FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="remesh a mesh at resolution R by optimising a SparseFlex field through the render loss",
        description="Optimises a SparseFlex field (corner SDF + deformation, FlexiCubes weights) on the mesh's "
        "dilated voxels at resolution R so that its depth / normal / mask renders match the mesh's from random "
        "and zoomed-in views, starting from the corner TSDF; then exports the extracted mesh. Open surfaces stay "
        "open. The result is in the input's units unless --normalized. This is also the upper bound of what the "
        "VAE's decoder can express at R. Defaults follow the device: on a GPU 400 steps of 4 views at 512 px "
        "(R = 256: about 25-45 s on an H200); on a CPU 130 steps of 2 views at 2R px (128..512), meant to finish "
        "R = 128 in about 2 minutes on 2 idle cores (R = 256 takes several times longer). Faces may be wound "
        "either way; open sheets and parts thinner than a voxel are recovered. Faces no view sees that lie more "
        "than a voxel from the input (e.g. an inner sheet's start continued past its rim) are dropped.",
    )
    p.add_argument("mesh", help="input mesh file (OBJ, PLY, STL, OFF, GLB, GLTF)")
    p.add_argument("-o", "--output", type=output_file(SAVE_FORMATS), required=True,
                   help="output mesh file (.obj, .ply, .glb); its folder is checked before the fit starts")
    p.add_argument("--resolution", "-r", type=int_at_least(4), required=True,
                   help="SparseFlex grid resolution R, at least 4 (e.g. 256)")
    p.add_argument("--steps", type=non_negative_int, default=None,
                   help="optimisation steps (default: 400 on a GPU, 130 on a CPU; 0 exports the starting field)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="render size in pixels (default: 512 on a GPU, 2R clamped to 128..512 on a CPU)")
    p.add_argument("--views", type=positive_int, default=None,
                   help="GT views rendered once and reused (default: 64 on a GPU, 32 on a CPU)")
    p.add_argument("--views-per-step", type=positive_int, default=None,
                   help="views rendered per step (default: 4 on a GPU, 2 on a CPU)")
    p.add_argument("--device", type=device, default="auto",
                   help="torch device: auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normalized", action="store_true", help="write the mesh in the [-0.5, 0.5]^3 frame")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from focusing.commands.format import plural
    from focusing.errors import FocusingError, InputError
    from focusing.io import Mesh, load_mesh, normalize, save_mesh
    from focusing.sparseflex.fit import FitConfig, fit_mesh

    mesh, norm = normalize(load_mesh(args.mesh), args.mesh)
    config = FitConfig.for_device(args.device, args.resolution)
    for name, field in (("image_size", "image_size"), ("views", "view_pool"), ("views_per_step", "views_per_step")):
        if getattr(args, name) is not None:
            setattr(config, field, getattr(args, name))
    try:
        out = fit_mesh(
            mesh, args.resolution, steps=args.steps, device=args.device, seed=args.seed, progress=not args.quiet,
            config=config,
        )
    except FocusingError as exc:  # an empty extraction: say which mesh, at which R, and why
        raise InputError(args.mesh, f"fit at R={args.resolution}: {exc} (the fitted SDF changes sign nowhere "
                         "inside the mesh's voxels; try a higher --resolution)") from None
    if not args.normalized:
        out = Mesh(norm.invert(out.vertices), out.faces)
    save_mesh(out, args.output)
    print(f"wrote {args.output}: {plural(len(out.vertices), 'vertex')}, {plural(len(out.faces), 'face')}")
    return 0
