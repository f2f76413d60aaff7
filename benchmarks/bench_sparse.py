"""Benchmark of the sparse backbone: transformer block, windowed attention overhead, sparse convolution.

    python benchmarks/bench_sparse.py --device cuda [--quick] [--json out.json]
    python benchmarks/bench_sparse.py --device cpu  [--quick]

Voxels: the surface voxels of a sphere (radius 0.45) at the resolution that gives at least N of them, cut to N
(sorted, so the cut removes a cap): windows of 8^3 are partly filled, like a real surface.

1. block: one SparseTransformerBlock fwd+bwd, tokens/s (CUDA: 768 ch, 12 heads, window 8, autocast bf16, at
   100K / 250K / 1M voxels, with and without gradient checkpointing; CPU: 256 ch, 4 heads, fp32, 10K-50K).
2. attention: on the same voxels, the raw attention kernel on already packed q, k, v (`varlen_attn` on CUDA;
   the bucketed SDPA route on CPU) fwd+bwd, beside what the block adds around it: pack + unpack (one `[N, C]`
   gather each way, fwd+bwd) and the window partition (computed once per structure, shared by every block).
3. conv: submanifold 3^3 conv fwd+bwd (CUDA: 192 ch, 1M voxels, autocast bf16; CPU: 64 ch, 50K): our implicit
   GEMM, scatter and (CUDA) Triton backends, and spconv when it imports and runs (a failure is recorded, not fatal).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focusing.models import SparseTransformerBlock  # noqa: E402
from focusing.sparse import SparseTensor, SubMConv3d, neighbor_map, window_partition  # noqa: E402
from focusing.sparse.attention import pack, packed_window_attention, resolve_backend, unpack  # noqa: E402
from focusing.sparse.conv import spconv_available  # noqa: E402
from focusing.sparse.triton_conv import triton_available  # noqa: E402

CONFIGS = {
    "cuda": dict(
        block_sizes=[100_000, 250_000, 1_000_000], channels=768, heads=12, dtype=torch.bfloat16,
        conv_sizes=[1_000_000], conv_channels=192, repeats=5,
    ),
    "cpu": dict(
        block_sizes=[10_000, 25_000, 50_000], channels=256, heads=4, dtype=torch.float32,
        conv_sizes=[50_000], conv_channels=64, repeats=2,
    ),
}
QUICK = {
    "cuda": dict(block_sizes=[100_000], conv_sizes=[250_000], repeats=2),
    "cpu": dict(block_sizes=[10_000], conv_sizes=[10_000], repeats=1),
}


def sphere_shell(n: int, device: torch.device, radius: float = 0.45) -> tuple[torch.Tensor, int]:
    """`[n, 4]` int32 sorted coords of voxels touched by a sphere surface, and the resolution used."""
    res = max(8, int(math.sqrt(n / (4 * math.pi * radius**2 * 1.5))))
    while True:
        m = int(4 * math.pi * (radius * res) ** 2 * 40)  # ~40 Fibonacci-sphere points per voxel area
        i = torch.arange(m, device=device, dtype=torch.float64) + 0.5
        phi, theta = torch.acos(1 - 2 * i / m), math.pi * (1 + 5**0.5) * i
        p = radius * torch.stack([theta.cos() * phi.sin(), theta.sin() * phi.sin(), phi.cos()], 1)
        v = torch.floor((p + 0.5) * res).long().clamp_(0, res - 1)
        keys = torch.unique((v[:, 0] * res + v[:, 1]) * res + v[:, 2])
        if len(keys) >= n:
            break
        res = int(res * 1.1) + 1
    keys = keys[:n]
    coords = torch.stack([torch.zeros_like(keys), keys // res**2, keys // res % res, keys % res], 1)
    return coords.to(torch.int32), res


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in ms after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def bench_block(coords, res, cfg, device, repeats, checkpoint):
    c, dtype = cfg["channels"], cfg["dtype"]
    block = SparseTransformerBlock(c, cfg["heads"], window_size=8, shift=4, use_checkpoint=checkpoint).to(device)
    x = SparseTensor(coords, torch.randn(len(coords), c, device=device, requires_grad=True), resolution=res)
    t0 = time.perf_counter()
    window_partition(x, 8, 4)
    sync(device)
    partition_ms = (time.perf_counter() - t0) * 1e3

    def step():
        with autocast(device, dtype):
            out = block(x).feats
        out.float().square().mean().backward()

    reset_peak(device)
    ms = timed(step, device, repeats)
    return dict(
        voxels=len(coords), channels=c, heads=cfg["heads"], dtype=str(dtype).split(".")[-1], checkpoint=checkpoint,
        ms=round(ms, 2), tokens_per_s=round(len(coords) / ms * 1e3), peak_gib=peak_memory(device),
        first_partition_ms=round(partition_ms, 2), attn_backend=resolve_backend(None, torch.empty(1, 1, 64,
        device=device, dtype=dtype)),
    )


def bench_attention(coords, cfg, device, repeats):
    c, heads, dtype = cfg["channels"], cfg["heads"], cfg["dtype"]
    x = SparseTensor(coords, torch.zeros(len(coords), 0, device=device))
    t0 = time.perf_counter()
    part = window_partition(x, 8, 0)
    sync(device)
    partition_ms = (time.perf_counter() - t0) * 1e3
    n = len(coords)
    q, k, v = (torch.randn(n, heads, c // heads, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(n, heads, c // heads, device=device, dtype=dtype)
    packed_window_attention(q, k, v, part)  # build any per-backend plan once, as the first block would

    def raw():
        torch.autograd.backward(packed_window_attention(q, k, v, part), grad)

    h = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
    h_grad = torch.randn(n, c, device=device, dtype=dtype)

    def pack_unpack():  # what the block adds around the kernel: one gather into window order and one back
        torch.autograd.backward(unpack(pack(h, part), part), h_grad)

    raw_ms = timed(raw, device, repeats)
    pu_ms = timed(pack_unpack, device, repeats)
    return dict(
        voxels=n, windows=len(part.lengths), mean_window=round(n / len(part.lengths), 1), max_window=part.max_len,
        backend=resolve_backend(None, q), raw_attention_ms=round(raw_ms, 2), pack_unpack_ms=round(pu_ms, 2),
        partition_ms=round(partition_ms, 2), overhead_pct=round(100 * pu_ms / raw_ms, 1),
        overhead_with_partition_pct=round(100 * (pu_ms + partition_ms) / raw_ms, 1),
    )


def bench_conv(coords, cfg, device, repeats, backends):
    c, dtype = cfg["conv_channels"], cfg["dtype"]
    x = SparseTensor(coords, torch.randn(len(coords), c, device=device))
    t0 = time.perf_counter()
    nbr = neighbor_map(x, 3, 1)
    sync(device)
    map_ms = (time.perf_counter() - t0) * 1e3
    runs = [(b, dtype) for b in backends]
    if device.type == "cuda" and "spconv" in backends and dtype == torch.bfloat16:
        runs.append(("spconv", torch.float16))  # in case spconv has no bf16 kernels
    rows = []
    for backend, run_dtype in runs:
        layer = SubMConv3d(c, c, backend=backend).to(device)
        xin = x.replace(x.feats.clone().requires_grad_(True))

        def step(layer=layer, xin=xin, run_dtype=run_dtype):
            with autocast(device, run_dtype):
                out = layer(xin).feats
            out.float().square().mean().backward()

        row = dict(voxels=len(coords), channels=c, dtype=str(run_dtype).split(".")[-1], backend=backend)
        try:
            reset_peak(device)
            row.update(ms=round(timed(step, device, repeats), 2), peak_gib=peak_memory(device))
        except Exception as e:  # spconv wheels may not match this torch / GPU / dtype; a kernel may not compile
            row.update(ms=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        rows.append(row)
    rows[0]["neighbor_map_ms"] = round(map_ms, 2)
    rows[0]["mean_neighbors"] = round((nbr < len(coords)).sum(1).float().mean().item(), 2)
    return rows


def print_table(title, rows, keys):
    print(f"\n{title}")
    print(" | ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(" | ".join(f"{str(r.get(k, '')):>14}" for k in keys))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smallest sizes, few repeats (smoke run)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = dict(CONFIGS[device.type], **(QUICK[device.type] if args.quick else {}))
    repeats = cfg["repeats"]
    info = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, threads=torch.get_num_threads(), quick=args.quick,
    )
    print(" ".join(f"{k}={v}" for k, v in info.items()))

    blocks, attn = [], []
    for n in cfg["block_sizes"]:
        coords, res = sphere_shell(n, device)
        attn.append(bench_attention(coords, cfg, device, repeats))
        for ckpt in (False, True):
            try:
                blocks.append(bench_block(coords, res, cfg, device, repeats, ckpt))
            except torch.OutOfMemoryError as e:  # recorded, so the other sizes still run
                blocks.append(dict(voxels=n, checkpoint=ckpt, ms=None, error=f"OOM: {str(e).splitlines()[0][:120]}"))
        print_table("block fwd+bwd", blocks[-2:], ["voxels", "checkpoint", "ms", "tokens_per_s", "peak_gib", "error"])
    print_table(
        "windowed attention fwd+bwd (window 8): raw kernel vs what the block adds",
        attn,
        ["voxels", "mean_window", "max_window", "backend", "raw_attention_ms", "pack_unpack_ms", "partition_ms",
         "overhead_pct", "overhead_with_partition_pct"],
    )

    backends = ["gemm", "scatter"] + (["triton"] if device.type == "cuda" and triton_available() else [])
    backends += ["spconv"] if spconv_available() else []
    conv = []
    for n in cfg["conv_sizes"]:
        coords, _ = sphere_shell(n, device)
        conv += bench_conv(coords, cfg, device, repeats, backends)
    if not spconv_available():
        conv.append(dict(backend="spconv", error="not importable"))
    print_table("submanifold conv 3^3 fwd+bwd", conv,
                ["voxels", "channels", "dtype", "backend", "ms", "peak_gib", "neighbor_map_ms", "error"])

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(info, block=blocks, attention=attn, conv=conv), indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
