"""`focusing render MESH --views K --out DIR`: depth, normal and mask pictures of a mesh from K cameras."""

from __future__ import annotations

import argparse
import re

from focusing.commands.checks import device, float_in, output_folder, positive_float, positive_int

PICTURE = re.compile(r"view_(\d{3,})_(depth|normal|mask)\.png")
"""The names of our pictures (view_XXX_<kind>.png, XXX the view's index)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render",
        help="render depth / normal / mask PNGs of a mesh from several views",
        description="Normalises the mesh into [-0.5, 0.5]^3 and renders it with the differentiable renderer from "
        "K cameras on a sphere around it (random, or an orbit with --orbit). Writes view_XXX_depth.png (colour-"
        "mapped, yellow = near), view_XXX_normal.png (world normals as RGB = (n + 1) / 2), view_XXX_mask.png "
        "(antialiased coverage) and cameras.json (view and projection matrices, OpenGL convention). Rendering into the "
        "folder of an earlier render replaces it: view_XXX pictures that this run does not write (an earlier run "
        "had more views) are removed, with a notice; other files are left alone.",
    )
    p.add_argument("mesh", help="mesh file (OBJ, PLY, STL, OFF, GLB/GLTF)")
    p.add_argument("--views", type=positive_int, default=8, help="number of views (default 8)")
    p.add_argument("--out", type=output_folder, required=True, help="output folder (created if missing)")
    p.add_argument("--resolution", type=positive_int, default=518,
                   help="image size in pixels (default 518, the paper's)")
    p.add_argument("--fov", type=float_in(0, 180), default=40.0,
                   help="vertical field of view in degrees, between 0 and 180 (default 40)")
    p.add_argument("--radius", type=positive_float, default=2.0,
                   help="camera distance from the centre, positive (default 2)")
    p.add_argument("--orbit", action="store_true", help="cameras evenly spaced around the object at 20 degrees "
                   "elevation instead of uniformly random on the sphere")
    p.add_argument("--seed", type=int, default=0, help="seed of the random cameras")
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--no-antialias", action="store_true", help="hard silhouettes")
    p.add_argument("--batch", type=positive_int, default=4, help="views rendered per call (memory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from focusing.commands.format import plural
    from focusing.io import load_mesh, normalize, write_text_atomic
    from focusing.render import render_mesh
    from focusing.render.antialias import mesh_topology
    from focusing.render.camera import orbit_cameras, random_cameras
    from focusing.render.images import depth_to_rgb, mask_to_gray, normal_to_rgb, save_png

    device = torch.device(args.device)
    mesh, _ = normalize(load_mesh(args.mesh))
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device)
    faces = torch.as_tensor(mesh.faces, device=device)
    common = dict(radius=args.radius, fov_deg=args.fov, resolution=args.resolution, device=device)
    if args.orbit:
        cameras = orbit_cameras(args.views, **common)
    else:
        cameras = random_cameras(args.views, generator=torch.Generator().manual_seed(args.seed), **common)
    topology = None if args.no_antialias else mesh_topology(faces, len(vertices))
    out = args.out
    with torch.no_grad():
        for start in range(0, args.views, args.batch):
            batch = cameras[start:start + args.batch]
            r = render_mesh(vertices, faces, batch, antialias=not args.no_antialias, topology=topology)
            for i in range(len(batch)):
                stem = out / f"view_{start + i:03d}"
                save_png(depth_to_rgb(r.depth[i], r.mask[i]), f"{stem}_depth.png")
                save_png(normal_to_rgb(r.normal[i], r.mask[i]), f"{stem}_normal.png")
                save_png(mask_to_gray(r.mask[i]), f"{stem}_mask.png")
    info = {"mesh": str(args.mesh), "resolution": args.resolution, "convention": "OpenGL; see focusing.render.camera",
            "view": cameras.view.cpu().tolist(), "proj": cameras.proj.cpu().tolist()}
    write_text_atomic(out / "cameras.json", json.dumps(info))
    stale = [f for f in out.iterdir() if (m := PICTURE.fullmatch(f.name)) and int(m[1]) >= args.views]
    for f in stale:
        f.unlink()
    if stale:
        print(f"removed {plural(len(stale), 'picture')} of an earlier render with more views from {out}")
    print(f"wrote {3 * args.views} PNGs and cameras.json to {out} ({plural(len(faces), 'face')}, {device})")
    return 0
