"""Benchmark of the view-consistent voxel selection (`focusing.carving`): how many latent voxels each stage keeps.

    python benchmarks/bench_carving.py --device cuda [--meshes DIR] [--names a,b] [--json out.json]
    python benchmarks/bench_carving.py --device cpu --resolutions 256,512 --names fandisk,beast,ogre --json x.json
    python benchmarks/bench_carving.py --device cpu --quick

For each mesh (normalised) and output resolution R: the latent voxels are the exact voxelisation at R / 4
(`focusing.data.voxelize`); for `--views` random views (`random_cameras`, 518^2) the GT depth is rendered without
antialiasing and every selection is run on that one view: frustum (TripoSF), carve (centre + corners, the
default), carve with the paper's centre-only test, and zoom (`select_voxels(mode="carve", zoom=True)`,
`--n-range`). Per (mesh, R): latent count, median over the views of each set's count, median ratio frustum /
carve, median milliseconds of each selection (the GT depth render is timed separately).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focusing import carving  # noqa: E402
from focusing.data.voxelize import voxelize, with_batch  # noqa: E402
from focusing.io import load_mesh, normalize  # noqa: E402
from focusing.render import random_cameras  # noqa: E402

NAMES = ["bunny", "fandisk", "beast", "ogre", "office_chair", "shrec_truck", "cycloidal_drive", "toaster"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def bench_mesh(path: Path, resolution: int, views: int, n_range, image: int, device, seed: int) -> dict:
    mesh, _ = normalize(load_mesh(path))
    latent_res = resolution // 4
    coords, voxelize_ms = timed(lambda: with_batch(voxelize(mesh, latent_res, device=device)), device)
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device)
    faces = torch.as_tensor(mesh.faces, dtype=torch.int64, device=device)
    cams = random_cameras(views, resolution=image, generator=torch.Generator().manual_seed(seed), device=device)
    r = 2.0 / resolution
    rows = []
    for i in range(views):
        cam = cams[i]
        depth, depth_ms = timed(lambda: carving.gt_depth_for_carving(vertices, faces, cam), device)
        fr, frustum_ms = timed(lambda: carving.frustum(coords, latent_res, cam), device)
        cv, carve_ms = timed(lambda: carving.carve(coords, latent_res, cam, depth, r), device)
        cc, centre_ms = timed(lambda: carving.carve(coords, latent_res, cam, depth, r, corners=False), device)
        gen = torch.Generator().manual_seed(seed + i)
        sel, zoom_ms = timed(lambda: carving.select_voxels(coords, latent_res, cam, mode="carve", zoom=True,
                                                           depth_map=depth, r=r, n_range=n_range, generator=gen),
                             device)
        rows.append({"frustum": int(fr.sum()), "carve": int(cv.sum()), "carve_centre": int(cc.sum()),
                     "zoom": sel.stats["n_zoom"], "zoomed": sel.stats.get("zoomed_items", 0),
                     "depth_ms": depth_ms, "frustum_ms": frustum_ms, "carve_ms": carve_ms, "centre_ms": centre_ms,
                     "zoom_ms": zoom_ms})

    def med(key):
        return statistics.median(row[key] for row in rows)

    return {
        "mesh": path.stem, "resolution": resolution, "latent_resolution": latent_res, "latent": len(coords),
        "voxelize_ms": voxelize_ms, **{k: med(k) for k in rows[0]},
        "frustum_over_carve": statistics.median(row["frustum"] / max(row["carve"], 1) for row in rows),
        "zoom_max": max(row["zoom"] for row in rows), "views": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--meshes", type=Path, default=Path("/work/shared/data/meshes"))
    ap.add_argument("--names", default=None, help=f"comma-separated mesh names (default: {','.join(NAMES)})")
    ap.add_argument("--resolutions", default="512,1024,2048", help="output resolutions R (latent grid R / 4)")
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--image", type=int, default=518)
    ap.add_argument("--n-range", default="2000,4000", help="zoom's N range: n_min,n_max")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 meshes, R = 256, 4 views, N in 500..1000")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.names.split(",") if args.names else NAMES
    resolutions = [int(x) for x in args.resolutions.split(",")]
    n_range = tuple(int(x) for x in args.n_range.split(","))
    views = args.views
    if args.quick:
        names, resolutions, views, n_range = names[:2], [256], 4, (500, 1000)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_carving on {device} ({machine}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{views} views at {args.image}^2, r = 2/R, zoom N in {n_range}")
    print("counts: median over the views; ms: median per view (depth = GT depth render for carving)\n")
    print("| mesh | R | latent | frustum | carve | carve (centre only) | frustum / carve | zoom (max) "
          "| depth ms | frustum ms | carve ms | zoom ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = {"device": str(device), "machine": machine, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "views": views, "image": args.image, "n_range": list(n_range),
               "rows": []}
    for resolution in resolutions:
        for name in names:
            r = bench_mesh(args.meshes / f"{name}.ply", resolution, views, n_range, args.image, device, args.seed)
            results["rows"].append(r)
            print(f"| {name} | {resolution} | {r['latent']:,} | {r['frustum']:,.0f} | {r['carve']:,.0f} | "
                  f"{r['carve_centre']:,.0f} | {r['frustum_over_carve']:.2f} | {r['zoom']:,.0f} ({r['zoom_max']:,}) | "
                  f"{r['depth_ms']:.0f} | {r['frustum_ms']:.1f} | {r['carve_ms']:.1f} | {r['zoom_ms']:.1f} |",
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        from focusing.io import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
