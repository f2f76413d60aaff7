"""Benchmark of SparseFlex: extraction speed / memory, and `fit` quality.

    python benchmarks/bench_sparseflex.py --device cuda --meshes /path/to/meshes [--quick] [--json out.json]
    python benchmarks/bench_sparseflex.py --device cpu  --meshes /work/shared/data/meshes [--quick]

1. extract: `sparseflex_mesh` forward (training split) + backward of (random projection of the vertices + L_dev
   + consistency) on N active voxels: the band (dilated by one voxel) around a bumpy sphere at the resolution
   that gives at least N voxels, cut to N. Per-voxel corner SDFs carry small noise (voxels disagree, like a
   decoder's output); δ, α, β, γ are random. CPU: 100K; CUDA: 100K, 1M, 4M. Median of `--repeats` runs;
   peak memory is CUDA's max allocated during one fwd+bwd.
2. fit: `fit_mesh` on bunny, fandisk, lilium_surface (open) at R = 128 (CPU) or 256 and 512 (CUDA), with the
   steps of `--steps R:STEPS,...`; against the GT, for the TSDF initialisation and for the fitted mesh:
   F-score@0.005 with 100K samples (the paper's protocol), which saturates at the GT's own resampling floor
   (~0.964 for bunny, ~0.973 for fandisk: reported as "F floor"), so also F-score@0.002 and Chamfer with 1M
   samples. Seconds for the whole fit (voxelisation, TSDF, GT renders, optimisation, export) and for its
   initialisation alone (voxelisation + corner TSDF).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focusing.data.grid import CORNER_OFFSETS  # noqa: E402
from focusing.sparseflex.extract import sparseflex_mesh  # noqa: E402
from focusing.sparseflex.fit import dilate  # noqa: E402

FIT_MESHES = ["bunny", "fandisk", "lilium_surface"]
DEFAULTS = {
    "cpu": dict(sizes=[100_000], fit_res="128:150", repeats=3),
    "cuda": dict(sizes=[100_000, 1_000_000, 4_000_000], fit_res="256:400,512:200", repeats=5),
}
QUICK = {
    "cpu": dict(sizes=[20_000], fit_res="64:20", repeats=1, meshes=["fandisk"]),
    "cuda": dict(sizes=[100_000], fit_res="128:50", repeats=2, meshes=["fandisk"]),
}


def bumpy_sphere(p: torch.Tensor) -> torch.Tensor:
    """A smooth closed test surface (not an exact SDF, which extraction does not need)."""
    bumps = torch.sin(17 * p[..., 0]) * torch.sin(19 * p[..., 1]) * torch.sin(13 * p[..., 2])
    return p.norm(dim=-1) - 0.35 - 0.03 * bumps


def band_voxels(n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """[n, 4] int32 sorted voxels around the bumpy sphere (surface voxels dilated by one), and R."""
    res = max(16, int(math.sqrt(n / 9.0)))
    while True:
        m = int(4 * math.pi * (0.4 * res) ** 2 * 20)  # ~20 points per voxel area, Fibonacci sphere
        i = torch.arange(m, device=device, dtype=torch.float64) + 0.5
        phi, theta = torch.acos(1 - 2 * i / m), math.pi * (1 + 5**0.5) * i
        d = torch.stack([theta.cos() * phi.sin(), theta.sin() * phi.sin(), phi.cos()], 1)
        r = torch.full((m,), 0.35, device=device, dtype=torch.float64)
        for _ in range(20):  # project onto the zero set along the ray (Newton on the radius)
            r = r - bumpy_sphere(d * r[:, None])
        xyz = torch.floor((d * r[:, None] + 0.5) * res).long().clamp_(0, res - 1)
        coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)
        coords = dilate(torch.unique(coords, dim=0), res, 1)
        if len(coords) >= n:
            return coords[:n].to(torch.int32), res
        res = int(res * math.sqrt(n / len(coords)) * 1.02) + 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_extract(n: int, device: torch.device, repeats: int) -> dict:
    coords, res = band_voxels(n, device)
    g = torch.Generator(device=device).manual_seed(0)
    pos = (coords[:, None, 1:] + CORNER_OFFSETS.to(device)).float() / res - 0.5
    sdf = bumpy_sphere(pos) + 0.1 / res * torch.randn(n, 8, generator=g, device=device)
    params = [
        sdf,
        0.3 * torch.randn(n, 8, 3, generator=g, device=device),
        0.3 * torch.randn(n, 8, generator=g, device=device),
        0.3 * torch.randn(n, 12, generator=g, device=device),
        torch.randn(n, generator=g, device=device),
    ]
    params = [p.requires_grad_() for p in params]

    def forward():
        return sparseflex_mesh(coords, res, *params, training=True)

    fwd, total, faces, peak = [], [], 0, None
    for i in range(repeats + 1):
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = forward()
        sync(device)
        t1 = time.perf_counter()
        loss = (out.vertices * 1e-3).sum() + out.dev_loss + out.consistency
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        if i:  # first run is a warm-up
            fwd.append((t1 - t0) * 1e3)
            total.append((t2 - t0) * 1e3)
        faces = len(out.faces)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        del out, loss
    return {
        "voxels": n, "resolution": res, "faces": faces,
        "fwd_ms": statistics.median(fwd), "fwd_bwd_ms": statistics.median(total), "peak_mb": peak,
    }


def quality(mesh, gt) -> dict:
    """The paper's protocol (100K samples, F@0.005) and a finer one (1M samples, F@0.002) against the GT."""
    from focusing.eval.metrics import surface_metrics

    paper = surface_metrics(mesh, gt, normalize=False)
    fine = surface_metrics(mesh, gt, n_samples=1_000_000, threshold=0.002, normalize=False)
    return {"fscore": paper.fscore, "chamfer": paper.chamfer, "fscore_fine": fine.fscore, "chamfer_fine": fine.chamfer}


def bench_fit(meshes_dir: Path, name: str, resolution: int, steps: int, device: torch.device, save: Path | None):
    from focusing.eval.metrics import surface_metrics
    from focusing.io import load_mesh, normalize, save_mesh
    from focusing.sparseflex.fit import FitConfig, init_field, optimize_field, result_mesh

    gt, _ = normalize(load_mesh(meshes_dir / f"{name}.ply"))
    config = FitConfig(steps=steps)
    if device.type == "cpu":
        config.image_size, config.view_pool = 256, 32
    sync(device)
    t0 = time.perf_counter()
    field, target = init_field(gt, resolution, config, device)
    sync(device)
    t_init = time.perf_counter() - t0
    with torch.no_grad():
        init = quality(result_mesh(field.extract(training=False)), gt)
    t1 = time.perf_counter()
    optimize_field(field, target, gt, config)
    with torch.no_grad():
        out = result_mesh(field.extract(training=False))
    sync(device)
    seconds = t_init + time.perf_counter() - t1  # the whole fit_mesh, without the metrics of the initial state
    if save:
        save_mesh(out, save / f"{name}_fit{resolution}.ply")
    return {
        "mesh": name, "resolution": resolution, "steps": steps, "seconds": seconds, "init_seconds": t_init,
        "voxels": len(field.coords), "faces": len(out.faces),
        # the GT against an independent resample of itself: the 100K-sample protocol's ceiling for this mesh
        "floor_fscore": surface_metrics(gt, gt, normalize=False, seed=7).fscore,
        **quality(out, gt), **{f"init_{k}": v for k, v in init.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--meshes", type=Path, default=Path("/work/shared/data/meshes"), help="folder with the .ply files")
    ap.add_argument("--quick", action="store_true", help="smoke run: one small size, one short fit")
    ap.add_argument("--sizes", default=None, help="comma-separated voxel counts for the extraction benchmark")
    ap.add_argument("--steps", default=None, help="fit resolutions and steps, e.g. 256:400,512:200 ('' = no fit)")
    ap.add_argument("--fit-meshes", default=None, help="comma-separated names (default bunny,fandisk,lilium_surface)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--save", type=Path, default=None, help="write the fitted meshes into this folder")
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = dict(DEFAULTS[device.type], meshes=FIT_MESHES)
    if args.quick:
        cfg.update(QUICK[device.type])
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else cfg["sizes"]
    fit_res = cfg["fit_res"] if args.steps is None else args.steps
    fits = [tuple(int(x) for x in item.split(":")) for item in fit_res.split(",") if item]
    meshes = args.fit_meshes.split(",") if args.fit_meshes else cfg["meshes"]
    repeats = args.repeats or cfg["repeats"]

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_sparseflex on {device} ({machine}), torch {torch.__version__}")
    results = {"device": str(device), "machine": machine, "torch": torch.__version__, "extract": [], "fit": []}

    print("\n| voxels | R | faces | fwd ms | fwd+bwd ms | peak MB |\n|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        r = bench_extract(n, device, repeats)
        results["extract"].append(r)
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "n/a"
        row = f"| {n:,} | {r['resolution']} | {r['faces']:,} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {peak} |"
        print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if fits:
        print("\nF: F-score@0.005, 100K samples (paper); floor: the GT against its own resample under that protocol;")
        print("F2: F-score@0.002, 1M samples; CD: Chamfer, 1M samples, in 1e-5; s: whole fit; init s: voxels + TSDF")
        print("\n| mesh | R | voxels | steps | F init | F fit | F floor | F2 init | F2 fit | CD init | CD fit | s "
              "| init s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    for resolution, steps in fits:
        for name in meshes:
            r = bench_fit(args.meshes, name, resolution, steps, device, args.save)
            results["fit"].append(r)
            print(
                f"| {name} | {resolution} | {r['voxels']:,} | {steps} | {r['init_fscore']:.4f} | {r['fscore']:.4f} | "
                f"{r['floor_fscore']:.4f} | {r['init_fscore_fine']:.4f} | {r['fscore_fine']:.4f} | "
                f"{r['init_chamfer_fine'] / 1e-5:.3f} | {r['chamfer_fine'] / 1e-5:.3f} | {r['seconds']:.1f} | "
                f"{r['init_seconds']:.1f} |",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        from focusing.io import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
