"""Benchmark of the differentiable renderer: depth + normal + mask, antialiased, at 518 x 518.

    python benchmarks/bench_render.py --device cuda [--quick] [--json out.json]
    python benchmarks/bench_render.py --device cpu  [--quick] [--threads 2]

Meshes: synthetic bumpy tori built on the device (closed, self-occluding, F = 2 * nu * nv triangles) of 100K,
1M, 5M and 10M triangles (CPU: 100K and 1M), normalised into [-0.5, 0.5]^3. Views: one camera at distance 2
(fov 40, the object fills about half the image) and the same camera zoomed (paper Eq. 4, s = 1.1) onto a box of
1/4 of the image width around a point of the surface, so triangles look 4x larger.

For every mesh, view and variant (CUDA: `triton` = Triton visibility + silhouette kernels, `triton+compile` =
the same with `use_torch_compile()`, `torch` = the pure-PyTorch reference path; CPU: `torch`):
- gt_fwd: render under no_grad (how ground truth is rendered),
- fwd / bwd: render with autograd, then backward of L1(depth) + L1(normal) + L1(mask) against zeros,
- peak_mib: peak CUDA memory of fwd+bwd above what the mesh and its topology hold (CPU: process max RSS),
- stages (no_grad, synchronised in between): rasterise, interpolate, silhouette search, blend,
- topology_ms: building the edge adjacency (`mesh_topology`), once per mesh (cached for GT meshes; a predicted
  mesh pays it every step, so add it to fwd for those).
Times are medians over --repeats after a warm-up, wall clock with device synchronisation, in ms.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focusing.device import use_torch_compile  # noqa: E402
from focusing.io import write_text_atomic  # noqa: E402
from focusing.render import Camera, look_at, mesh_topology, perspective, render_mesh  # noqa: E402
from focusing.render.antialias import blend_silhouettes, find_silhouette_crossings  # noqa: E402
from focusing.render.interpolate import interpolate  # noqa: E402
from focusing.render.raster import clip_space, rasterize  # noqa: E402

SIZES = {"cuda": [100_000, 1_000_000, 5_000_000, 10_000_000], "cpu": [100_000, 1_000_000]}
QUICK_SIZES = {"cuda": [100_000, 1_000_000], "cpu": [100_000]}
REPEATS = {"cuda": 10, "cpu": 3}


def bumpy_torus(n_faces: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A torus grid with bumps: vertices [V, 3] float32 in [-0.5, 0.5]^3, faces [F, 3] int64, F ~ n_faces."""
    nv = max(3, round(math.sqrt(n_faces / 2 / 3)))
    nu = max(3, round(n_faces / 2 / nv))
    u = torch.arange(nu, device=device, dtype=torch.float64) * (2 * math.pi / nu)
    v = torch.arange(nv, device=device, dtype=torch.float64) * (2 * math.pi / nv)
    uu, vv = torch.meshgrid(u, v, indexing="ij")
    r = 0.12 * (1 + 0.15 * torch.sin(7 * uu) * torch.cos(5 * vv))
    ring = 0.3 + r * torch.cos(vv)
    pts = torch.stack([ring * torch.cos(uu), r * torch.sin(vv), ring * torch.sin(uu)], -1).reshape(-1, 3)
    i = torch.arange(nu, device=device)[:, None]
    j = torch.arange(nv, device=device)[None, :]
    a, b = i * nv + j, ((i + 1) % nu) * nv + j
    c, d = ((i + 1) % nu) * nv + (j + 1) % nv, i * nv + (j + 1) % nv
    faces = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([a, c, d], -1).reshape(-1, 3)])
    pts = pts - (pts.amax(0) + pts.amin(0)) / 2
    pts = pts / (pts.amax(0) - pts.amin(0)).max()
    return pts.float(), faces


def cameras(resolution: int, device: torch.device) -> dict[str, Camera]:
    eye = torch.tensor([[1.2, 1.1, 1.2]], device=device)
    eye = eye / eye.norm() * 2.0
    cam = Camera(look_at(eye, torch.zeros_like(eye)), perspective(40.0, device=device), resolution, resolution)
    ndc, _ = cam.project(torch.tensor([[0.3, 0.0, 0.12]], device=device))     # a point on the outer rim
    x, y = ndc[0, 0, 0], ndc[0, 0, 1]
    box = torch.stack([x - 0.25, x + 0.25, y - 0.25, y + 0.25])[None]
    return {"full": cam, "zoomed": cam.zoomed(box, 1.1)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(samples: list[float]) -> float:
    s = sorted(samples)
    return 1000.0 * s[len(s) // 2]


def measure(vertices, faces, topology, camera, backend: str, repeats: int, device) -> dict:
    """gt_fwd, fwd, bwd medians (ms), peak memory, covered pixels and silhouette crossings."""
    def forward_backward():
        x = vertices.detach().requires_grad_()
        sync(device)
        t0 = time.perf_counter()
        out = render_mesh(x, faces, camera, topology=topology, backend=backend)
        sync(device)
        t1 = time.perf_counter()
        (out.depth.abs().mean() + out.normal.abs().mean() + out.mask.abs().mean()).backward()
        sync(device)
        return t1 - t0, time.perf_counter() - t1, out

    def gt_forward():
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            render_mesh(vertices, faces, camera, topology=topology, backend=backend)
        sync(device)
        return time.perf_counter() - t0

    forward_backward()
    gt_forward()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    fb = [forward_backward() for _ in range(repeats)]
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gt = [gt_forward() for _ in range(repeats)]
    out = fb[-1][2]
    return {"gt_fwd_ms": median_ms(gt), "fwd_ms": median_ms([f for f, _, _ in fb]),
            "bwd_ms": median_ms([b for _, b, _ in fb]), "peak_mib": round(peak, 1),
            "covered_px": int((out.tri_id >= 0).sum()), "aa_mask_sum": float(out.mask.detach().sum())}


def stages(vertices, faces, topology, camera, backend: str, repeats: int, device) -> dict:
    """Forward stage times (no_grad, ms): rasterise, interpolate, silhouette search, blend."""
    mvp = camera.mvp()

    def run():
        marks = []
        with torch.no_grad():
            sync(device)
            marks.append(time.perf_counter())
            clip = clip_space(vertices, mvp)
            tri_id = rasterize(clip, faces, camera.height, camera.width, backend=backend)
            sync(device)
            marks.append(time.perf_counter())
            image = interpolate(vertices, faces, camera, tri_id)
            sync(device)
            marks.append(time.perf_counter())
            if backend == "torch":
                crossings = find_silhouette_crossings(tri_id, image[..., 0], clip, faces, topology)
            else:
                from focusing.render.antialias import MAX_STEPS
                from focusing.render.antialias_triton import find_silhouette_crossings_triton

                crossings = find_silhouette_crossings_triton(tri_id, image[..., 0], clip, faces, topology.table,
                                                             MAX_STEPS)
            sync(device)
            marks.append(time.perf_counter())
            blend_silhouettes(image, crossings, vertices, mvp)
            sync(device)
            marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])], len(crossings.p0)

    run()
    runs = [run() for _ in range(repeats)]
    names = ["raster_ms", "interpolate_ms", "silhouette_search_ms", "blend_ms"]
    result = {n: median_ms([r[0][i] for r in runs]) for i, n in enumerate(names)}
    result["crossings"] = runs[-1][1]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer sizes, 2 repeats, no compile variant")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--sizes", help="comma-separated triangle counts (default: per device)")
    p.add_argument("--resolution", type=int, default=518)
    p.add_argument("--repeats", type=int)
    p.add_argument("--variants", help="comma-separated: triton, triton+compile, torch (default: per device)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else \
        (QUICK_SIZES if args.quick else SIZES)[device.type]
    repeats = args.repeats or (2 if args.quick else REPEATS[device.type])
    if args.variants:
        variants = args.variants.split(",")
    elif device.type == "cuda":
        variants = ["triton", "torch"] if args.quick else ["triton", "triton+compile", "torch"]
    else:
        variants = ["torch"]
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        import triton

        machine["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"# bench_render on {machine}, {args.resolution}x{args.resolution}, repeats {repeats}")
    header = (f"{'faces':>10} {'view':>7} {'variant':>15} {'gt_fwd':>8} {'fwd':>8} {'bwd':>8} {'fwd+bwd':>8} "
              f"{'peakMiB':>8} {'raster':>7} {'interp':>7} {'search':>7} {'blend':>7} {'topo':>7} {'covered':>8}")
    print(header)
    results = []
    for n in sizes:
        vertices, faces = bumpy_torus(n, device)
        sync(device)
        t0 = time.perf_counter()
        topology = mesh_topology(faces, len(vertices))
        sync(device)
        topo_ms = 1000 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        mesh_topology(faces, len(vertices))
        sync(device)
        topo_ms = min(topo_ms, 1000 * (time.perf_counter() - t0))
        for view, camera in cameras(args.resolution, device).items():
            for variant in variants:
                use_torch_compile(variant.endswith("+compile"))
                backend = variant.split("+")[0]
                row = {"faces": len(faces), "vertices": len(vertices), "view": view, "variant": variant,
                       "resolution": args.resolution, "topology_ms": topo_ms}
                try:
                    row.update(measure(vertices, faces, topology, camera, backend, repeats, device))
                    row.update(stages(vertices, faces, topology, camera, backend, max(1, repeats // 2), device))
                except Exception as exc:  # a failing variant is recorded, the rest still runs
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                    print(f"{len(faces):>10} {view:>7} {variant:>15}  FAILED {row['error']}")
                    results.append(row)
                    continue
                results.append(row)
                print(f"{len(faces):>10} {view:>7} {variant:>15} {row['gt_fwd_ms']:8.2f} {row['fwd_ms']:8.2f} "
                      f"{row['bwd_ms']:8.2f} {row['fwd_ms'] + row['bwd_ms']:8.2f} {row['peak_mib']:8.1f} "
                      f"{row['raster_ms']:7.2f} {row['interpolate_ms']:7.2f} {row['silhouette_search_ms']:7.2f} "
                      f"{row['blend_ms']:7.2f} {topo_ms:7.1f} {row['covered_px']:8d}", flush=True)
        del vertices, faces, topology
        if device.type == "cuda":
            torch.cuda.empty_cache()
    use_torch_compile(False)
    if args.json:
        write_text_atomic(args.json, json.dumps({"machine": machine, "args": vars(args), "results": results},
                                                indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
