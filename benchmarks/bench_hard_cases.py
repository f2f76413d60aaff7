"""Raw meshes as they come (issue 15): the synthetic hard cases, their corner TSDF and `fit` on them.

    python benchmarks/bench_hard_cases.py --write DIR               # the hard-case meshes as DIR/<name>.ply
    python benchmarks/bench_hard_cases.py --cpu 64 [--json out.json] # TSDF + fit at R on this machine's CPU
    python benchmarks/bench_hard_cases.py --gpu-command              # the GPU benchmark command (prints it)

--cpu R, per hard case (`focusing.eval.hard_cases`): seconds of `corner_tsdf` at the corners of the exact voxels
(R) and at those of the voxels dilated by one (what `fit` uses), the share of surface voxels with a zero crossing
(the TSDF start has a surface there), and `fit` with the CPU defaults (`FitConfig.for_device`): seconds,
F-score@0.005, precision, recall (100K samples, against the hard case itself). Also the corner TSDF's CPU cost on
bunny at R = 64 and 128 (--tsdf-mesh) for the VAE's warm-up. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focusing.data.grid import voxel_corners  # noqa: E402
from focusing.data.tsdf import corner_tsdf  # noqa: E402
from focusing.data.voxelize import voxelize, with_batch  # noqa: E402
from focusing.eval import hard_cases  # noqa: E402
from focusing.sparseflex.fit import dilate  # noqa: E402

GPU_COMMAND = """\
python benchmarks/bench_hard_cases.py --write /tmp/hard && \\
for m in gt-resample sdf-mc poisson; do python -m focusing benchmark --method $m --data /tmp/hard -r 256 \\
  --out $OUT/$m-hard --workers 8 --quiet --no-report; done; \\
timeout 440 python -m focusing benchmark --method fit --data /tmp/hard ${MESHES:-shared/data/meshes} -r 256 --out $OUT/fit --workers 4 --quiet \\
  --no-report; python -m focusing benchmark --method fit --data /tmp/hard ${MESHES:-shared/data/meshes} -r 256 --out $OUT/fit --table-only"""


def crossed_share(coords: torch.Tensor, corners: torch.Tensor, s: torch.Tensor) -> float:
    """Share of voxels coords [N, 4] whose 8 corners hold s < 0 and s >= 0 (corners [M, 4] sorted, s [M])."""
    c, v2c = voxel_corners(coords)
    key = lambda x: (x[:, 1].long() * 4096 + x[:, 2]) * 4096 + x[:, 3]  # noqa: E731
    value = s[torch.searchsorted(key(corners), key(c))][v2c]
    return float(((value < 0).any(1) & (value >= 0).any(1)).double().mean())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cpu_rows(resolution: int, fit: bool) -> list[dict]:
    from focusing.eval.metrics import surface_metrics
    from focusing.sparseflex.fit import fit_mesh

    rows = []
    for name, mesh in hard_cases.hard_cases().items():
        surface = with_batch(voxelize(mesh, resolution))
        corners, _ = voxel_corners(surface)
        s, t_exact = timed(lambda: corner_tsdf(mesh, corners, resolution))
        plain = corner_tsdf(mesh, corners, resolution, thin_shell=False)
        band, _ = voxel_corners(dilate(surface, resolution, 1))
        _, t_band = timed(lambda: corner_tsdf(mesh, band, resolution))
        row = {
            "name": name, "faces": len(mesh.faces), "corners": len(corners), "tsdf_s": round(t_exact, 2),
            "band_corners": len(band), "band_tsdf_s": round(t_band, 2),
            "crossed": round(crossed_share(surface, corners, s), 4),
            "crossed_no_shell": round(crossed_share(surface, corners, plain), 4),
        }
        if fit:
            out, seconds = timed(lambda: fit_mesh(mesh, resolution, device="cpu"))
            m = surface_metrics(out, mesh, normalize=False)
            row.update(fit_s=round(seconds, 1), fscore=round(m.fscore, 4), precision=round(m.precision, 4),
                       recall=round(m.recall, 4))
        rows.append(row)
        print(row, flush=True)
    return rows


def tsdf_cost(mesh_path: Path) -> list[dict]:
    from focusing.io import load_mesh, normalize

    mesh, _ = normalize(load_mesh(mesh_path))
    rows = []
    for r in (64, 128):
        corners, _ = voxel_corners(with_batch(voxelize(mesh, r)))
        _, seconds = timed(lambda: corner_tsdf(mesh, corners, r))
        rows.append({"mesh": mesh_path.stem, "resolution": r, "corners": len(corners), "seconds": round(seconds, 2),
                     "us_per_corner": round(1e6 * seconds / len(corners), 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", metavar="DIR", help="write the hard-case meshes as DIR/<name>.ply and exit")
    p.add_argument("--cpu", type=int, metavar="R", help="TSDF and fit on the CPU at resolution R")
    p.add_argument("--no-fit", action="store_true", help="with --cpu: the TSDF only")
    p.add_argument("--tsdf-mesh", type=Path, default=Path("/work/shared/data/meshes/bunny.ply"))
    p.add_argument("--gpu-command", action="store_true", help="print the GPU benchmark command and exit")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if args.gpu_command:
        print(GPU_COMMAND)
        return
    if args.write:
        from focusing.io import save_mesh

        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for name, mesh in hard_cases.hard_cases().items():
            save_mesh(mesh, out / f"{name}.ply")
            print(f"wrote {out / name}.ply: {len(mesh.faces)} faces")
        return
    if not args.cpu:
        p.error("give --write DIR, --cpu R or --gpu-command")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "resolution": args.cpu,
        "hard_cases": cpu_rows(args.cpu, not args.no_fit),
        "tsdf_cost": tsdf_cost(args.tsdf_mesh) if args.tsdf_mesh.exists() else [],
    }
    keys = list(result["hard_cases"][0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in result["hard_cases"]:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
