"""Sparse Swin transformer: pre-norm blocks of shifted-window attention + MLP over sparse voxels (paper §3.4).

Blocks alternate window shifts 0 and window_size // 2 so information crosses window borders. The voxel
positions enter once, added after the input layer, as one of:
- "absolute": a sinusoidal embedding of the integer coords (TripoSF's APE; ties the model to the coordinate
  range it was trained on);
- "window": a learned embedding of the position inside the (unshifted) window, (xyz mod window_size), so the
  network is translation invariant by whole windows and decodes grids of any size the same way (a local model);
- "none".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from focusing.device import fused
from focusing.models.recompute import checkpoint_row_chunks, host_checkpoint
from focusing.sparse.attention import (
    WindowPartition,
    pack,
    packed_window_attention,
    unpack,
    window_chunks,
    window_partition,
)
from focusing.sparse.tensor import SparseTensor


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 if it is a 16-bit float, else as is: LayerNorms of a 16-bit stream compute in fp32 on every device
    (CUDA's autocast upcasts them, the CPU's does not; in bf16 their weight gradients lose ~1 digit)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls will run in: the autocast dtype when autocast is on for t's device, else t's."""
    device_type = t.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else t.dtype


class AbsolutePositionEmbedder(nn.Module):
    """Sinusoidal embedding of integer voxel coords `[N, 3]` -> `[N, channels]` (no parameters).

    Each axis gets channels // 6 frequencies 1 / max_period^(i / F), as (sin, cos) pairs; leftover channels are 0.
    """

    def __init__(self, channels: int, max_period: float = 10000.0):
        super().__init__()
        self.channels = channels
        n_freq = channels // 6
        freqs = 1.0 / max_period ** (torch.arange(n_freq, dtype=torch.float32) / max(n_freq, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        angles = coords.to(torch.float32)[:, :, None] * self.freqs  # [N, 3, F]
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)
        return F.pad(emb, (0, self.channels - emb.shape[1]))


class WindowPositionEmbedder(nn.Module):
    """Learned embedding of the cell of each voxel inside its window: coords `[N, 3]` -> `[N, channels]`."""

    def __init__(self, channels: int, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.table = nn.Embedding(window_size**3, channels)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        cell = torch.remainder(coords.to(torch.int64), self.window_size)
        return self.table((cell[:, 0] * self.window_size + cell[:, 1]) * self.window_size + cell[:, 2])


POSITION_EMBEDDINGS = ("absolute", "window", "none")
STREAM_DTYPES = ("float32", "autocast")


class SparseWindowAttention(nn.Module):
    """Multi-head self-attention within shifted windows: qkv projection, windowed attention, output projection.

    The features are put in window order once (`pack`, a single `[N, C]` gather in the matmul dtype), and the
    projections run on the packed rows, so only two gathers surround the attention kernel.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        *,
        window_size: int = 8,
        shift: int = 0,
        qk_rms_norm: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.channels, self.num_heads = channels, num_heads
        self.window_size, self.shift, self.backend = window_size, shift, backend
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)
        head_dim = channels // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_rms_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_rms_norm else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        part = window_partition(x, self.window_size, self.shift)
        h = pack(x.feats.to(_autocast_dtype(x.feats)), part)  # [T, C] in window order
        return x.replace(unpack(self.to_out(self.attend_qkv(self.to_qkv(h), part)), part))

    def attend_qkv(self, qkv: torch.Tensor, part: WindowPartition) -> torch.Tensor:
        """Packed projections `[T, 3C]` (q, k, v; window order of `part`) -> attention `[T, C]` (before to_out)."""
        q, k, v = qkv.view(len(qkv), 3, self.num_heads, self.channels // self.num_heads).unbind(1)
        if self.q_norm is not None:
            q, k = qk_norm(self.q_norm, q), qk_norm(self.k_norm, k)
        return packed_window_attention(q, k, v, part, self.backend).reshape(len(qkv), self.channels)


def qk_norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` in x's dtype (the weight cast to it), so that under autocast the fused RMSNorm kernel runs instead
    of the composite one that a bf16 input with an fp32 weight falls back to; `[..., D]` -> `[..., D]`."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


def attention_input(rows: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
                    qkv_bias: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """A block's first per-voxel part: LayerNorm, cast to the matmul dtype, qkv projection; `[T, C]` -> `[T, 3C]`."""
    h = F.layer_norm(_at_least_fp32(rows), rows.shape[-1:], norm_weight, norm_bias, eps).to(dtype)
    return F.linear(h, qkv_weight, qkv_bias)


def attention_output_and_mlp(rows: torch.Tensor, attended: torch.Tensor, out_weight: torch.Tensor,
                             out_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                             fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                             fc2_bias: torch.Tensor) -> torch.Tensor:
    """A block's second per-voxel part: rows + to_out(attended), then + mlp(norm2(...)); `[T, C]` x2 -> `[T, C]`."""
    rows = rows + F.linear(attended, out_weight, out_bias)
    h = F.layer_norm(_at_least_fp32(rows), rows.shape[-1:], norm_weight, norm_bias, eps)
    return rows + F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias), approximate="tanh"), fc2_weight, fc2_bias)


class SparseTransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); feats `[N, C]` -> `[N, C]`.

    use_checkpoint: recompute the block in the backward pass instead of storing its activations.
    chunk_tokens: when > 0 and the block has more voxels, run it in chunks of whole windows of at most that many
        voxels (`window_chunks`; a longer window is a chunk alone), recomputed chunk by chunk in the backward when
        gradients are on (`checkpoint_row_chunks`, whatever use_checkpoint says). Windows do not interact within a
        block and the rest is per voxel, so the result is the same (up to float rounding), but the backward pass
        keeps only the block's input and holds, besides the output's and the input's gradients, one chunk's
        recomputed intermediates at a time (qkv, attention, MLP hidden: ~42 KB per voxel for C = 768,
        bench_sparse) instead of the whole block's. Without gradients it runs chunk by chunk (a lower transient
        peak).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        window_size: int = 8,
        shift: int = 0,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
        attn_backend: str | None = None,
        chunk_tokens: int = 0,
    ):
        super().__init__()
        self.use_checkpoint, self.chunk_tokens = use_checkpoint, chunk_tokens
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.attn = SparseWindowAttention(
            channels, num_heads, window_size=window_size, shift=shift, qk_rms_norm=qk_rms_norm, backend=attn_backend
        )
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def _forward(self, feats: torch.Tensor, x: SparseTensor) -> torch.Tensor:
        part = window_partition(x, self.attn.window_size, self.attn.shift)
        return unpack(self._chunk(pack(feats, part), part), part)

    def _chunk(self, rows: torch.Tensor, part: WindowPartition) -> torch.Tensor:
        """The block on packed rows `[T, C]` that hold whole windows (`part`: their own partition)."""
        attn, mlp = self.attn, self.mlp
        qkv = fused(attention_input, len(rows))(rows, self.norm1.weight, self.norm1.bias, attn.to_qkv.weight,
                                                attn.to_qkv.bias, self.norm1.eps, _autocast_dtype(rows))
        return fused(attention_output_and_mlp, len(rows))(
            rows, attn.attend_qkv(qkv, part), attn.to_out.weight, attn.to_out.bias, self.norm2.weight,
            self.norm2.bias, self.norm2.eps, mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)

    def forward(self, x: SparseTensor, store: bool = False) -> SparseTensor:
        """store: keep this call's activations for the backward (no chunks, no checkpoint), whatever the settings."""
        if store:
            return x.replace(self._forward(x.feats, x))
        part = window_partition(x, self.attn.window_size, self.attn.shift)  # cached outside the checkpointed code
        if 0 < self.chunk_tokens < len(x):
            chunks = window_chunks(part, self.chunk_tokens)
            rows = part.order.split([len(c.order) for c in chunks])  # each chunk's voxels, in window order
            return x.replace(checkpoint_row_chunks(self._chunk, x.feats, list(zip(rows, chunks)),
                                                   list(self.parameters())))
        if self.use_checkpoint and torch.is_grad_enabled():
            return x.replace(checkpoint(self._forward, x.feats, x, use_reentrant=False))
        return x.replace(self._forward(x.feats, x))


class SparseTransformer(nn.Module):
    """Input linear + position embedding -> `num_blocks` Swin blocks (shifts 0, w/2, 0, ...) -> norm + output linear.

    feats `[N, in_channels]` -> `[N, out_channels]` on the same voxels. block_chunk: each block's `chunk_tokens`.
    block_group: when > 1 and gradients are on, runs of this many consecutive blocks are checkpointed as one, a
        second level over the blocks' own checkpointing: the backward pass keeps one `[N, C]` input per run instead
        of one per checkpointed block (12 blocks in runs of 4: 4 + 4 held at most instead of 12), at the cost of
        one more forward of the blocks. Same result (the recomputation is the same computation).
    block_offload: the runs' inputs wait in host memory for the backward (`recompute.host_checkpoint`; needs
        block_group >= 1, 1 = every block its own run): the device then holds one run's inputs at a time, for one
        device -> host and one host -> device copy of `[N, C]` a run. Same result.
    stream_dtype: the residual stream between the blocks. "float32": under autocast the LayerNorms' fp32 outputs
        keep it in fp32; "autocast": cast to the autocast dtype after the position embedding (TRELLIS's fp16
        blocks), which halves the stored block inputs and the per-voxel traffic around the matmuls but rounds the
        stream to bf16 / fp16 (the LayerNorms still compute in fp32). Without autocast both are the same.
    store_rows: a budget of stored activations, in voxel-blocks: with gradients on, the first `store_rows // N`
        blocks on N voxels keep their activations for the backward (neither chunked nor recomputed), the others
        follow use_checkpoint / block_chunk. Spends spare memory on less recomputation (a small decoded set keeps
        all its blocks, a large encoded one few or none); same result. Not with block_group / block_offload.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        window_size: int = 8,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
        attn_backend: str | None = None,
        pos_embedding: str = "absolute",
        block_chunk: int = 0,
        block_group: int = 0,
        block_offload: bool = False,
        stream_dtype: str = "float32",
        store_rows: int = 0,
    ):
        super().__init__()
        if store_rows and (block_offload or block_group > 1):
            raise ValueError("store_rows does not combine with block_group / block_offload (their runs recompute)")
        if block_offload and block_group < 1:
            raise ValueError("block_offload needs block_group >= 1 (the runs whose inputs go to host memory)")
        if stream_dtype not in STREAM_DTYPES:
            raise ValueError(f"stream_dtype must be one of {STREAM_DTYPES}, got {stream_dtype!r}")
        self.block_group, self.block_offload, self.stream_dtype = block_group, block_offload, stream_dtype
        self.store_rows = store_rows
        if pos_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"pos_embedding must be one of {POSITION_EMBEDDINGS}, got {pos_embedding!r}")
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.pos_embedder = {
            "absolute": lambda: AbsolutePositionEmbedder(model_channels),
            "window": lambda: WindowPositionEmbedder(model_channels, window_size),
            "none": lambda: None,
        }[pos_embedding]()
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(
                model_channels,
                num_heads,
                mlp_ratio=mlp_ratio,
                window_size=window_size,
                shift=(window_size // 2) * (i % 2),
                use_checkpoint=use_checkpoint,
                qk_rms_norm=qk_rms_norm,
                attn_backend=attn_backend,
                chunk_tokens=block_chunk,
            )
            for i in range(num_blocks)
        )
        self.out_norm = nn.LayerNorm(model_channels, eps=1e-6)
        self.out_layer = nn.Linear(model_channels, out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.input_layer(x.feats)
        if self.pos_embedder is not None:
            h = h + self.pos_embedder(x.coords[:, 1:])
        if self.stream_dtype == "autocast":
            h = h.to(_autocast_dtype(h))
        n, g = len(self.blocks), self.block_group
        if torch.is_grad_enabled() and (self.block_offload or 1 < g < n):
            for start in range(0, n, g):
                if self.block_offload:
                    params = [p for b in self.blocks[start:start + g] for p in b.parameters()]
                    h = host_checkpoint(lambda f, s=start: self._run_blocks(f, x, s, s + g), h, params)
                else:
                    h = checkpoint(self._run_blocks, h, x, start, start + g, use_reentrant=False)
        else:
            stored = self.store_rows // max(len(x), 1) if torch.is_grad_enabled() else 0
            h = self._run_blocks(h, x, 0, n, stored)
        return x.replace(self.out_layer(self.out_norm(_at_least_fp32(h))))

    def _run_blocks(self, feats: torch.Tensor, x: SparseTensor, start: int, stop: int, stored: int = 0) -> torch.Tensor:
        """Blocks `start:stop` on feats `[N, C]` (on x's voxels) -> `[N, C]`; the first `stored` keep their
        activations (`SparseTransformerBlock.forward`'s store)."""
        h = x.replace(feats)
        for i, block in enumerate(self.blocks[start:stop]):
            h = block(h, store=i < stored)
        return h.feats
