"""Time and peak memory of `focusing prepare` per mesh, broken down by step (load, sample, voxelize, tsdf, write).

Each (mesh, resolution) case runs in a fresh subprocess, so its peak RSS (getrusage ru_maxrss, read after
each step: the running peak) is its own; with --device cuda the CUDA peak of each step is reported too
(torch.cuda.max_memory_allocated, reset between steps). Meshes: three real ones of different sizes from the
shared set plus a ~1.1M-face midpoint subdivision of the bunny (written to a temporary PLY), which also checks
that a 1M-face mesh at R = 1024 voxelises within a few GB.

    python benchmarks/bench_prepare.py --device cuda --json bench_prepare.json      # full: R = 256, 512, 1024
    python benchmarks/bench_prepare.py --quick                                       # smoke run on CPU
    python benchmarks/bench_prepare.py --meshes bunny_x16 --resolutions 1024 --voxelize-only   # 1M faces, memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's `focusing`, also without `pip install -e .`
SHARED = Path(os.environ.get("FOCUSING_MESHES", ROOT.parent / "shared" / "data" / "meshes"))
MESHES = ["idler_riser", "bunny", "skull", "bunny_x16"]  # 1.5K, 69K, 100K, 1.1M faces
QUICK_MESHES = ["idler_riser", "bunny"]
STEPS = ("load", "sample", "voxelize", "tsdf", "write")


def mesh_path(name: str, workdir: Path) -> Path:
    """A mesh of the shared set, or `<name>_x16`: that mesh midpoint-subdivided twice (16x the faces)."""
    if not name.endswith("_x16"):
        for folder in (SHARED, ROOT / "tests" / "data"):
            if (folder / f"{name}.ply").is_file():
                return folder / f"{name}.ply"
        raise SystemExit(f"bench_prepare: mesh {name}.ply not found in {SHARED} (set FOCUSING_MESHES)")
    out = workdir / f"{name}.ply"
    if not out.exists():
        import trimesh

        from focusing.io import load_mesh, save_mesh
        from focusing.io.mesh import Mesh

        base = load_mesh(mesh_path(name[: -len("_x16")], workdir))
        v, f = trimesh.remesh.subdivide(base.vertices, base.faces)
        v, f = trimesh.remesh.subdivide(v, f)
        save_mesh(Mesh(v, f), out)
    return out


def run_case(path: str, resolution: int, points: int, device: str, threads: int | None, voxelize_only: bool) -> dict:
    """One case in this process: prepare the mesh, write the item to a temporary file, report the figures.
    With `voxelize_only`, just load + normalise and build the voxel pyramid (the other steps read 0)."""
    import torch
    import trimesh  # noqa: F401  (imported up front: import time is not the load step's)

    from focusing.data.prepare import PrepareSettings, _StepTimer, prepare_mesh, write_item
    from focusing.data.voxelize import voxel_pyramid
    from focusing.io import load_mesh, normalize

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.zeros(1, device=dev)  # initialise the device (CUDA context) before timing
    rss: dict[str, float] = {"start": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

    class Timer(_StepTimer):  # also records the running RSS peak after each step
        def mark(self, step: str) -> None:
            super().mark(step)
            rss[step] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)

    settings = PrepareSettings(resolution=resolution, points=points, device=device)
    timer = Timer(dev)
    if voxelize_only:
        mesh, _ = normalize(load_mesh(path))
        timer.mark("load")
        pyramid = voxel_pyramid(mesh, resolution, device=dev)
        timer.mark("voxelize")
        for step in ("sample", "tsdf", "write"):
            timer.seconds[step] = 0.0
        counts = {"faces": len(mesh.faces), "corners": 0, **{f"voxels_{k}": len(v) for k, v in pyramid.items()}}
        return _row(path, resolution, 0, counts, sorted(pyramid), timer, rss, 0, device)
    tensors, meta = prepare_mesh(path, settings, timer)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "item.safetensors"
        write_item(file, tensors, meta)
        timer.mark("write")
        size = file.stat().st_size
    return _row(path, resolution, points, meta["counts"], meta["levels"], timer, rss, size, device)


def _row(path, resolution, points, counts, levels, timer, rss, size, device) -> dict:
    import torch

    return {
        "mesh": Path(path).stem,
        "faces": counts["faces"],
        "resolution": resolution,
        "points": points,
        "voxels": [counts[f"voxels_{level}"] for level in levels],
        "corners": counts["corners"],
        "seconds": timer.seconds,
        "total_s": sum(timer.seconds.values()),
        "peak_rss_gib": rss,
        "cuda_peak_gib": {k: v / 2**30 for k, v in timer.cuda_peak.items()},
        "file_mib": size / 2**20,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def table(rows: list[dict]) -> str:
    head = (
        ["mesh", "faces", "R", "voxels(R)", "corners"]
        + [f"{s} s" for s in STEPS]
        + ["total s", "RSS GiB", "CUDA GiB", "MiB"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mesh']} | | {r['resolution']} | failed: {r['error']} |")
            continue
        cuda = max(r["cuda_peak_gib"].values()) if r["cuda_peak_gib"] else float("nan")
        cells = [r["mesh"], f"{r['faces']:,}", str(r["resolution"]), f"{r['voxels'][-1]:,}", f"{r['corners']:,}"]
        cells += [f"{r['seconds'][s]:.2f}" for s in STEPS]
        cells += [
            f"{r['total_s']:.2f}",
            f"{max(r['peak_rss_gib'].values()):.2f}",
            f"{cuda:.2f}",
            f"{r['file_mib']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--meshes", nargs="+", default=None, help=f"names in the shared set (default {' '.join(MESHES)})")
    p.add_argument("--points", type=int, default=819_200)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke run: idler_riser and bunny at R = 32, 64, 20K points")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--voxelize-only", action="store_true", help="only load + voxel pyramid (e.g. the 1M-face memory check)"
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case (default 3600)")
    p.add_argument("--case", nargs=2, metavar=("PATH", "R"), help=argparse.SUPPRESS)  # internal: one case
    args = p.parse_args()
    if args.case:
        row = run_case(args.case[0], int(args.case[1]), args.points, args.device, args.threads, args.voxelize_only)
        print(json.dumps(row))
        return
    meshes = args.meshes or (QUICK_MESHES if args.quick else MESHES)
    resolutions = [32, 64] if args.quick else args.resolutions
    points = 20_000 if args.quick else args.points
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in meshes:
            path = mesh_path(name, Path(workdir))
            for r in resolutions:
                cmd = [
                    sys.executable,
                    __file__,
                    "--case",
                    str(path),
                    str(r),
                    "--points",
                    str(points),
                    "--device",
                    args.device,
                ]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                cmd += ["--voxelize-only"] if args.voxelize_only else []
                start = time.perf_counter()
                try:
                    done = subprocess.run(
                        cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, check=False
                    )
                    ok = done.returncode == 0
                    row = json.loads(done.stdout.strip().splitlines()[-1]) if ok else None
                    error = None if ok else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                except subprocess.TimeoutExpired:
                    row, error = None, f"timeout after {args.timeout:.0f} s"
                rows.append(row or {"mesh": name, "resolution": r, "error": error})
                wall = time.perf_counter() - start
                print(
                    f"{name} R={r}: {'%.1f s' % row['total_s'] if row else error} (case wall {wall:.1f} s)",  # noqa: UP031
                    file=sys.stderr,
                )
    print(table(rows))
    if args.json:
        import torch

        machine = {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        }
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
