"""Shifted-window self-attention over sparse voxels (the Swin attention of TRELLIS / TripoSF).

Voxels are grouped into cubic windows of `window_size`^3 cells, the grid shifted by `shift` (window w holds the
voxels with (xyz + shift) // window_size == w, per batch item: windows never mix batch items). Each voxel
attends to the voxels of its own window only.

Data flow: `window_partition` sorts the voxels window by window once per structure (cached on the
SparseTensor's spatial cache) -> `pack` puts features in that order (windows become contiguous variable-length
sequences, described by `cu_seqlens`) -> `packed_window_attention` attends -> `unpack` restores voxel order.
`window_chunks` cuts a partition into runs of whole windows, each a partition of its own packed rows (the
transformer block's `chunk_tokens`).

Backends (argument `backend`, else the env var FOCUSING_ATTN_BACKEND, else "auto"):
- "varlen": PyTorch's `torch.nn.attention.varlen.varlen_attn` (flash attention on packed sequences; CUDA,
  fp16/bf16). Chosen automatically when it applies.
- "sdpa": windows grouped by length into buckets, each padded to its longest window and run through
  `scaled_dot_product_attention` with a key-padding mask (none when a bucket is all full windows). Works on
  every device and dtype; the CPU route and the fp32 reference.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from focusing.data.grid import linearize
from focusing.sparse.gather import gather_rows, permute_rows
from focusing.sparse.tensor import SparseTensor

BACKENDS = ("varlen", "sdpa")

_BUCKET_GROWTH = 1.25  # a bucket pads its windows by at most ~25% (caps grow geometrically, multiples of 8)
_SCORES_BUDGET = 2**28  # bytes of attention scores per SDPA call in the "sdpa" route (chunks of windows)


@dataclass
class WindowPartition:
    """Voxels sorted window by window.

    order: `[N]` int64, packed row p holds voxel order[p]; the voxels of a window are contiguous.
    inverse: `[N]` int64, voxel i sits at packed row inverse[i].
    lengths: `[W]` int64 voxels per (non-empty) window; cu_seqlens: `[W + 1]` int32 their cumulative sums.
    max_len: the longest window.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    lengths: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    window_size: int
    shift: int
    plans: dict = field(default_factory=dict, repr=False)  # per-backend index plans, built on first use


def window_partition(x: SparseTensor, window_size: int = 8, shift: int = 0) -> WindowPartition:
    """The partition of `x`'s voxels into windows of `window_size`^3 shifted by `shift` (cached per structure)."""

    def compute() -> WindowPartition:
        n, device = len(x), x.device
        cells = x.coords.to(torch.int64)
        cells[:, 1:] = torch.div(cells[:, 1:] + shift, window_size, rounding_mode="floor")
        keys = linearize(cells, (x.spatial_extent + shift) // window_size + 1)
        sorted_keys, order = torch.sort(keys, stable=True)
        _, lengths = torch.unique_consecutive(sorted_keys, return_counts=True)
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=device)
        max_len = int(lengths.max().item()) if n else 0
        return WindowPartition(order, inverse, lengths, cu_seqlens, max_len, window_size, shift)

    return x.cache.get_or_compute(("window_partition", window_size, shift), compute)


def pack(feats: torch.Tensor, part: WindowPartition) -> torch.Tensor:
    """Voxel order `[N, ...]` -> window (packed) order `[N, ...]`."""
    return permute_rows(feats, part.order, part.inverse)


def unpack(packed: torch.Tensor, part: WindowPartition) -> torch.Tensor:
    """Window (packed) order `[N, ...]` -> voxel order `[N, ...]`."""
    return permute_rows(packed, part.inverse, part.order)


def window_chunks(part: WindowPartition, max_tokens: int) -> list[WindowPartition]:
    """`part` cut into consecutive runs of whole windows of at most `max_tokens` packed rows each (a longer window
    is a run alone), each the partition of its own rows: row r of a run is the packed row (its first) + r of
    `part` (order and inverse are the identity). Planned once per (partition, max_tokens), with one host sync,
    and cached."""
    key = ("chunks", max_tokens)
    if key not in part.plans:
        cu = part.cu_seqlens.cpu().long()  # the one host sync
        lengths, runs, lo = cu.diff(), [], 0
        while lo < len(lengths):  # greedy: the most windows that fit, at least one
            hi = max(lo + 1, int(torch.searchsorted(cu, cu[lo] + max_tokens, right=True)) - 1)
            rows = torch.arange(int(cu[hi] - cu[lo]), device=part.order.device)
            runs.append(WindowPartition(rows, rows, part.lengths[lo:hi], part.cu_seqlens[lo : hi + 1] - int(cu[lo]),
                                        int(lengths[lo:hi].max()), part.window_size, part.shift))
            lo = hi
        part.plans[key] = runs
    return part.plans[key]


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


def resolve_backend(backend: str | None, q: torch.Tensor) -> str:
    """The attention backend for packed q `[T, H, D]`: `backend`, else FOCUSING_ATTN_BACKEND, else automatic."""
    name = (backend or os.environ.get("FOCUSING_ATTN_BACKEND") or "auto").lower()
    varlen_ok = (
        q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    )
    if name == "auto":
        return "varlen" if varlen_ok and _varlen_attn() is not None else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)} or auto")
    if name == "varlen":
        if _varlen_attn() is None:
            raise RuntimeError("attention backend 'varlen' needs torch.nn.attention.varlen (torch >= 2.9)")
        if not varlen_ok:
            raise RuntimeError(
                f"attention backend 'varlen' needs CUDA fp16/bf16 with head dim % 8 == 0 and <= 256, got "
                f"{q.device.type} {q.dtype} head dim {q.shape[-1]}"
            )
    return name


def _bucket_caps(max_len: int) -> list[int]:
    caps = [8]
    while caps[-1] < max_len:
        caps.append(8 * math.ceil(caps[-1] * _BUCKET_GROWTH / 8))
    return caps


def _sdpa_plan(part: WindowPartition, heads: int, element_size: int) -> tuple:
    """Index plan of the "sdpa" route: windows bucketed by length, each bucket padded to its longest window.

    All buckets are laid side by side in one padded row space of P rows. Returns
    (pieces [(windows w, width L, key mask [w, 1, 1, L] or None)], gather `[P]` (packed row of each padded row;
    padding reads row 0), position `[T]` (padded row of each packed row), scatter `[P]` (packed row, padding = T)).
    """
    lengths, device = part.lengths, part.lengths.device
    total = int(part.cu_seqlens[-1])
    caps = torch.tensor(_bucket_caps(part.max_len), device=device)
    bucket_of = torch.searchsorted(caps, lengths)  # first cap >= length
    win_order = torch.argsort(bucket_of, stable=True)
    counts = torch.bincount(bucket_of, minlength=len(caps)).tolist()
    starts = part.cu_seqlens[:-1].to(torch.int64)
    pieces, scatters, s = [], [], 0
    for count in counts:
        wins = win_order[s : s + count]
        s += count
        if count == 0:
            continue
        lens = lengths[wins]
        width = int(lens.max())
        per_call = max(1, _SCORES_BUDGET // (heads * width * width * max(element_size, 4)))
        cols = torch.arange(width, device=device)
        for c in range(0, count, per_call):
            w, n = wins[c : c + per_call], lens[c : c + per_call]
            valid = cols[None, :] < n[:, None]
            scatters.append(torch.where(valid, starts[w][:, None] + cols[None, :], total).reshape(-1))
            pieces.append((len(w), width, None if bool(valid.all()) else valid[:, None, None, :]))
    scatter = torch.cat(scatters) if scatters else torch.zeros(0, dtype=torch.int64, device=device)
    is_pad = scatter == total
    gather = scatter.masked_fill(is_pad, 0)
    position = torch.empty(total, dtype=torch.int64, device=device)
    valid_rows = torch.nonzero(~is_pad).squeeze(1)
    position[scatter[valid_rows]] = valid_rows
    return pieces, gather, position, scatter


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: WindowPartition) -> torch.Tensor:
    heads, dim = q.shape[1], q.shape[2]
    key = ("sdpa", heads, q.element_size(), q.device)
    if key not in part.plans:
        part.plans[key] = _sdpa_plan(part, heads, q.element_size())
    pieces, gather, position, scatter = part.plans[key]
    # padded rows: padding queries are dropped and padding keys masked, so their gradients are zero
    qp, kp, vp = (gather_rows(t, gather, position) for t in (q, k, v))
    sizes = [w * width for w, width, _ in pieces]
    outs = []
    for (w, width, mask), qb, kb, vb in zip(pieces, qp.split(sizes), kp.split(sizes), vp.split(sizes)):
        qb, kb, vb = (t.view(w, width, heads, dim).transpose(1, 2) for t in (qb, kb, vb))
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # [w, H, L, D]
        outs.append(out.transpose(1, 2).reshape(w * width, heads, dim))
    return gather_rows(torch.cat(outs), position, scatter, zero_pad=True)


def packed_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: WindowPartition, backend: str | None = None
) -> torch.Tensor:
    """Attention within each window of packed q, k, v `[T, H, D]` (window order) -> `[T, H, D]`, scale 1/sqrt(D)."""
    if len(q) == 0:
        return q.clone()
    if resolve_backend(backend, q) == "varlen":
        cu = part.cu_seqlens
        return _varlen_attn()(q, k, v, cu, cu, part.max_len, part.max_len)
    return _attend_sdpa(q, k, v, part)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: WindowPartition, backend: str | None = None
) -> torch.Tensor:
    """Windowed attention on q, k, v `[N, H, D]` in voxel order -> `[N, H, D]` in voxel order."""
    out = packed_window_attention(pack(q, part), pack(k, part), pack(v, part), part, backend)
    return unpack(out, part)
