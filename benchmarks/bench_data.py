"""Time to build one training sample on the device from the packed corpus (`focusing.data.online`), by stage:
decode (unpack one mesh), augment (rotation + stretch + re-normalise, CPU float64), sample (P oriented points,
torch), pyramid (exact voxels at R, coarsened to R/2, R/4), for each R and P; apart, the exact voxels at R/4
alone (latent_only, what the generator's batches build instead of the pyramid). Then, unless --no-overlap, the
question that decides `reuse`: does building overlap training? A stand-in training step (bf16 matmuls on the
default stream, --step-ms long) runs alone, then with the batch built synchronously before it, then with the
background builder (`prefetch`, own CUDA stream) fetching the next batch.

    python benchmarks/bench_data.py --device cuda --corpus .devdata/corpus.safetensors    # R 256, 512; P 200K, 819,200
    python benchmarks/bench_data.py --device cpu --resolutions 64 128 --points 20000 100000 --samples 8 --no-overlap

Meshes: `--samples` meshes drawn at random (seed 0) from the corpus, the same for every setting; the first
one is built twice before timing (CUDA warm-up). Writes JSON (--json, default benchmarks/results/data_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's `focusing`, also without `pip install -e .`

import numpy as np  # noqa: E402
import torch  # noqa: E402

STAGES = ("decode", "augment", "sample", "pyramid", "tsdf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stages(corpus, index: int, resolution: int, points: int, device: torch.device, key,
                tsdf: float | None = None) -> dict:
    """Seconds per stage of building one sample, and its voxel / face counts. tsdf: the truncation (voxels) of
    the warm-up's corner TSDF of the R-level voxels (`corner_targets`); None = not timed (0)."""
    from focusing.data.online import (AugmentConfig, _generator, _seeds, augment_mesh, corner_targets,
                                      sample_surface_torch)
    from focusing.data.voxelize import voxel_pyramid, voxelize

    seconds = {}
    t = time.perf_counter()
    mesh = corpus.mesh(index)
    seconds["decode"] = time.perf_counter() - t
    rng, torch_seed = _seeds(key)
    t = time.perf_counter()
    mesh = augment_mesh(mesh, AugmentConfig(), rng)
    seconds["augment"] = time.perf_counter() - t
    t = time.perf_counter()
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float64, device=device)
    faces = torch.as_tensor(mesh.faces, device=device)
    sample_surface_torch(vertices, faces, points, _generator(device, torch_seed))
    _sync(device)
    seconds["sample"] = time.perf_counter() - t
    t = time.perf_counter()
    pyramid = voxel_pyramid(mesh, resolution, device=device)
    _sync(device)
    seconds["pyramid"] = time.perf_counter() - t
    t = time.perf_counter()
    voxelize(mesh, resolution // 4, device=device)  # what a latent_only batch builds instead of the pyramid
    _sync(device)
    latent = time.perf_counter() - t
    t = time.perf_counter()
    if tsdf is not None:
        corner_targets(mesh, pyramid[resolution], resolution, tsdf)
        _sync(device)
    seconds["tsdf"] = time.perf_counter() - t if tsdf is not None else 0.0
    return {"seconds": seconds, "latent_only": latent, "faces": len(mesh.faces), "voxels": len(pyramid[resolution])}


def stage_table(args, corpus, device) -> list[dict]:
    picks = np.random.default_rng(0).choice(len(corpus), size=min(args.samples, len(corpus)), replace=False)
    rows = []
    for resolution in args.resolutions:
        for points in args.points:
            for _ in range(2):
                time_stages(corpus, int(picks[0]), resolution, points, device, (0, 0), args.tsdf)
            runs = [time_stages(corpus, int(i), resolution, points, device, (0, n), args.tsdf)
                    for n, i in enumerate(picks)]
            row = {"resolution": resolution, "points": points, "samples": len(runs),
                   "median_faces": int(statistics.median(r["faces"] for r in runs)),
                   "mean_voxels": int(statistics.fmean(r["voxels"] for r in runs))}
            for stage in STAGES:
                row[f"{stage}_ms"] = 1000 * statistics.fmean(r["seconds"][stage] for r in runs)
            row["total_ms"] = sum(row[f"{s}_ms"] for s in STAGES)
            row["latent_only_ms"] = 1000 * statistics.fmean(r["latent_only"] for r in runs)  # not in the total
            row["max_total_ms"] = 1000 * max(sum(r["seconds"].values()) for r in runs)
            rows.append(row)
            print(f"R={resolution} P={points}: {row['total_ms']:.1f} ms/sample", file=sys.stderr)
    return rows


def fake_step(device: torch.device, n_matmuls: int) -> None:
    """A stand-in training step: bf16 matmuls on the current stream (4096^2 on CUDA, 256^2 on the CPU)."""
    size = 4096 if device.type == "cuda" else 256
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(n_matmuls):
        a = torch.tanh(a @ a)


def overlap(args, device) -> list[dict]:
    """Step time of the stand-in step alone, after a synchronous build, and with the background builder."""
    from focusing.data.online import AugmentConfig, make_source

    fake_step(device, 5)
    _sync(device)
    t = time.perf_counter()
    fake_step(device, 20)
    _sync(device)
    n_matmuls = max(1, round(20 * args.step_ms / 1000 / (time.perf_counter() - t)))
    rows = []
    for resolution in args.resolutions:
        for points in args.points:
            row = {"resolution": resolution, "points": points, "batch_size": args.batch_size, "reuse": args.reuse}
            for mode, prefetch in (("alone", None), ("sync", 0), ("prefetch", 2)):
                source = None if mode == "alone" else make_source(
                    args.corpus, resolution=resolution, points=points, batch_size=args.batch_size, seed=0,
                    device=device, augment=AugmentConfig(), reuse=args.reuse, prefetch=prefetch)
                times = []
                for step in range(args.steps + 2):
                    _sync(device)
                    t = time.perf_counter()
                    if source is not None:
                        batch = source.next_batch()
                        batch["points"].sum()  # the step reads the batch on its stream
                    fake_step(device, n_matmuls)
                    _sync(device)
                    if step >= 2:
                        times.append(time.perf_counter() - t)
                if source is not None:
                    source.close()
                row[f"{mode}_ms"] = 1000 * statistics.fmean(times)
            rows.append(row)
            print(f"overlap R={resolution} P={points}: {row}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(ROOT / ".devdata" / "corpus.safetensors"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--points", type=int, nargs="+", default=[200_000, 819_200])
    parser.add_argument("--samples", type=int, default=32, help="meshes timed per setting")
    parser.add_argument("--batch-size", type=int, default=4, help="meshes per batch in the overlap test")
    parser.add_argument("--reuse", type=int, default=1, help="uses of each built batch in the overlap test")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per overlap mode")
    parser.add_argument("--step-ms", type=float, default=500.0, help="duration of the stand-in training step")
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--tsdf", type=float, default=None, metavar="VOXELS",
                        help="also time the warm-up's corner TSDF truncated at VOXELS (the S config: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from focusing.data.corpus import PackedCorpus

    device = torch.device(args.device)
    corpus = PackedCorpus(args.corpus)
    rows = stage_table(args, corpus, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"\n{name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, corpus {len(corpus)} meshes")
    print("| R | P | meshes | median faces | mean voxels (R) | " + " | ".join(f"{s} ms" for s in STAGES)
          + " | total ms | max ms | R/4 alone ms |")
    print("|---:" * (8 + len(STAGES)) + "|")
    for r in rows:
        print(f"| {r['resolution']} | {r['points']:,} | {r['samples']} | {r['median_faces']:,} | {r['mean_voxels']:,} | "
              + " | ".join(f"{r[f'{s}_ms']:.1f}" for s in STAGES) + f" | **{r['total_ms']:.1f}** | {r['max_total_ms']:.1f} | {r['latent_only_ms']:.1f} |")
    result = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "stages": rows}
    if not args.no_overlap:
        result["overlap"] = overlap(args, device)
        print(f"\nstand-in step {args.step_ms:.0f} ms, batch of {args.batch_size}, reuse {args.reuse}: step time in ms")
        print("| R | P | step alone | + sync build | + prefetch build |")
        print("|---:|---:|---:|---:|---:|")
        for r in result["overlap"]:
            print(f"| {r['resolution']} | {r['points']:,} | {r['alone_ms']:.1f} | {r['sync_ms']:.1f} | "
                  f"{r['prefetch_ms']:.1f} |")
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"data_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
