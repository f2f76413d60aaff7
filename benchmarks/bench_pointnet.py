"""Cost of the local PointNet alone (forward + backward, with its chunks' recomputation), eager and compiled.

    python benchmarks/bench_pointnet.py --device cuda --json pointnet.json          # B's PointNet, 819,200 points
    python benchmarks/bench_pointnet.py --device cuda --profile 18                  # + the top kernels of one step
    python benchmarks/bench_pointnet.py --quick                                     # CPU smoke run

Random points, `--per-voxel` of them on average in each occupied voxel of a `--resolution` grid (training: ~12 at
the latent resolution), unit normals; B's PointNet (1024 / 256 channels, 5 blocks) in checkpointed chunks of
`--chunk` points, under bf16 autocast on CUDA (fp32 on the CPU). Per variant (eager, compiled =
`focusing.device.use_torch_compile`): median ms of `--steps` steps after `--warmup`, peak CUDA memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from focusing.device import use_torch_compile  # noqa: E402
from focusing.io import write_text_atomic  # noqa: E402
from focusing.models.pointnet import LocalPointNet  # noqa: E402


def oriented_points(count: int, resolution: int, per_voxel: float, device) -> tuple:
    """(points `[P, 3]` in [-0.5, 0.5)^3, normals `[P, 3]`, coords `[N, 4]` of the occupied voxels, sorted)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    cells = torch.unique(torch.randint(0, resolution, (int(count / per_voxel), 3), generator=g), dim=0)
    pick = torch.randint(0, len(cells), (count,), generator=g)
    points = (cells[pick] + torch.rand(count, 3, generator=g)) / resolution - 0.5
    normals = torch.nn.functional.normalize(torch.randn(count, 3, generator=g), dim=1)
    pick = torch.unique(pick)  # voxels with points, in the order of cells (sorted by unique)
    coords = torch.cat([torch.zeros(len(pick), 1, dtype=torch.long), cells[pick]], 1).int()
    return points.to(device), normals.to(device), coords.to(device)


def measure(net, points, normals, coords, resolution: int, steps: int, warmup: int, profile: int) -> dict:
    device = points.device
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = net(points, normals, coords, resolution)
        out.float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    row = {"ms": statistics.median(times), "ms_all": times,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profiler(activities=activities) as prof:
            step()
            sync()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=profile, max_name_column_width=60)
        print(table)
        row["profile"] = table
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--points", type=int, default=819_200)
    ap.add_argument("--resolution", type=int, default=512, help="latent grid the points fall in")
    ap.add_argument("--per-voxel", type=float, default=12.0, help="mean points per occupied voxel")
    ap.add_argument("--channels", type=int, nargs=2, default=(1024, 256), metavar=("OUT", "HIDDEN"))
    ap.add_argument("--chunk", type=int, default=262_144, help="points per checkpointed chunk (0: none)")
    ap.add_argument("--variants", default="eager,compiled")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="top N kernels of one more step (0: no profile)")
    ap.add_argument("--quick", action="store_true", help="5,000 points, 64 / 32 channels, 1 step")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.points, args.resolution, args.channels, args.chunk, args.steps, args.warmup = 5_000, 32, (64, 32), 1024, 1, 1
    device = torch.device(args.device)
    points, normals, coords = oriented_points(args.points, args.resolution, args.per_voxel, device)
    torch.manual_seed(0)
    net = LocalPointNet(*args.channels, 5, chunk_points=args.chunk).to(device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": str(device), "machine": machine, "torch": torch.__version__, "settings": vars(args) | {
        "json": str(args.json)}, "voxels": len(coords), "rows": []}
    print(f"# bench_pointnet on {machine}: {args.points:,} points in {len(coords):,} voxels, channels "
          f"{args.channels[0]} / {args.channels[1]}, chunks of {args.chunk:,}")
    print("| variant | ms fwd+bwd | peak GiB |\n|---|---:|---:|")
    try:
        for variant in args.variants.split(","):
            use_torch_compile(variant == "compiled")
            row = {"variant": variant, **measure(net, points, normals, coords, args.resolution, args.steps,
                                                 args.warmup, args.profile)}
            result["rows"].append(row)
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
            print(f"| {variant} | {row['ms']:.1f} | {peak} |", flush=True)
    finally:
        use_torch_compile(False)
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
