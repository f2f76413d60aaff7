"""Data-parallel training as DDP does it, on `torch.distributed` directly: the process group from torchrun's
environment, rank 0's initial parameters broadcast to every rank, and gradients averaged after each backward in
flat buckets. A parameter without a gradient on some rank counts as zeros there (a VAE head unused in a step);
one without a gradient on every rank keeps `grad = None`, as in a single process."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from focusing.device import resolve_device
from focusing.errors import FocusingError

BUCKET_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank among world_size processes, its local rank and torch device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise FocusingError(f"environment variable {name}={value!r} is not an integer") from None


def setup_distributed(device: str | torch.device | None = "auto") -> Distributed:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; with more than one process, join the process group (NCCL
    on CUDA, with NCCL_NVLS_ENABLE=0 unless set; gloo on CPU) and bind CUDA device LOCAL_RANK. Without torchrun:
    rank 0 of 1 on `device`."""
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    resolved = resolve_device(device)
    if world_size <= 1:
        return Distributed(0, 1, 0, resolved)
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise FocusingError(f"LOCAL_RANK {local_rank} has no CUDA device ({torch.cuda.device_count()} visible)")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Distributed(rank, world_size, local_rank, resolved)


def teardown_distributed() -> None:
    """Leave the process group (when one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(module: torch.nn.Module, ctx: Distributed) -> None:
    """Give every rank rank 0's parameters and buffers."""
    if ctx.world_size <= 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], ctx: Distributed, bucket_bytes: int = BUCKET_BYTES) -> None:
    """All-reduce the gradients of `params` (mean over ranks) in flat buckets of about `bucket_bytes`; a
    missing gradient is zeros, and stays None only when it is missing on every rank."""
    if ctx.world_size <= 1 or not params:
        return
    device = params[0].device
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(used)
    used_anywhere = used.tolist()
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for i, p in enumerate(params):
        if not used_anywhere[i]:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p)
        size += p.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket, ctx.world_size)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, ctx.world_size)


def _reduce_bucket(bucket: list[torch.nn.Parameter], world_size: int) -> None:
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in bucket:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for p in group:
            n = p.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
            offset += n


def any_rank(flag: bool, ctx: Distributed) -> bool:
    """True on every rank when `flag` is true on any rank (so that all ranks take the same branch)."""
    if ctx.world_size <= 1:
        return flag
    t = torch.tensor([float(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_json(obj, ctx: Distributed) -> list:
    """Rank 0 gets the JSON-able `obj` of every rank (a list in rank order); other ranks get []. Bytes travel as
    uint8 tensors (no pickle)."""
    if ctx.world_size <= 1:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).to(ctx.device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=ctx.device)
    lengths = [torch.zeros_like(length) for _ in range(ctx.world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=torch.uint8, device=ctx.device)
    padded[: data.numel()] = data
    gathered = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded)
    if not ctx.is_main:
        return []
    return [json.loads(bytes(g[: int(n.item())].cpu().tolist()).decode("utf-8")) for g, n in zip(gathered, lengths)]
