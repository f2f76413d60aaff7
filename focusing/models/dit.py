"""The two flow transformers (paper §3.5, TRELLIS's `SparseStructureFlowModel` / `SLatFlowModel`): DiT blocks with
timestep adaLN and cross-attention to image tokens, on sparse voxels.

    model = StructureFlow(StructureFlowConfig())                    # dense latent [B, 8, 16, 16, 16]
    cond = model.encode_condition(images)                           # [B, T, D] image tokens
    v = model(x_t, t, cond)                                          # velocity, same shape as x_t; t [B] in [0, 1]

    model = LatentFlow(LatentFlowConfig())                          # the shape VAE's latent voxels
    v = model(z_t, t, cond)                                          # SparseTensor [N, 8] -> SparseTensor [N, 8]

One block (`ModulatedBlock`, DiT's adaLN-Zero): from the timestep embedding, per batch item, shift / scale /
gate of the self-attention and the MLP; x += gate * attn(modulate(norm(x))); x += cross_attn(norm(x), tokens);
x += gate * mlp(modulate(norm(x))). The self-attention is our windowed sparse attention
(`focusing.models.transformer.SparseWindowAttention`): the latent flow uses shifted windows of `window_size`;
the structure flow puts its dense 16^3 grid on sparse voxels (every cell) with one window covering the grid, so
its attention is global. Cross-attention runs per batch item over its voxels (padded to the longest item).
The modulation and the output layer start at zero (the model starts as v = 0). The timestep enters as
t * 1000 in a sinusoidal embedding (TRELLIS's).

The flow models carry the data normalisation of their latents (`mean`, `std` per channel; buffers, so they
travel with the weights): they see (x - mean) / std. `calibrate` sets them once from the first training batch
(averaged over ranks), TRELLIS's `slat_normalization` measured on the data at hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from focusing.models.image_encoder import ImageEncoderConfig, build_image_encoder, resize_images
from focusing.models.transformer import (
    AbsolutePositionEmbedder,
    SparseWindowAttention,
    WindowPositionEmbedder,
    qk_norm,
)
from focusing.sparse.attention import window_partition
from focusing.sparse.tensor import SparseTensor


@dataclass
class DiTConfig:
    """The transformer of a flow model."""

    channels: int = 768
    blocks: int = 12
    head_channels: int = 64  # heads = channels // head_channels
    mlp_ratio: float = 4.0
    window_size: int = 8  # latent flow: shifted windows of this size (the structure flow attends globally)
    pos_embedding: str = "absolute"  # "absolute" (sinusoidal in the voxel coords), "window" or "none"
    qk_rms_norm: bool = True
    use_checkpoint: bool = False

    def __post_init__(self):
        if self.channels % self.head_channels:
            raise ValueError(f"channels {self.channels} is not a multiple of head_channels {self.head_channels}")


@dataclass
class StructureFlowConfig:
    """The sparse-structure flow: a DiT over the dense latent `[B, latent_channels, G, G, G]`."""

    resolution: int = 16  # G, the structure VAE's latent grid
    latent_channels: int = 8
    dit: DiTConfig = field(default_factory=DiTConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)


@dataclass
class LatentFlowConfig:
    """The structured-latent flow: a sparse DiT over the shape VAE's latent voxels `[N, latent_channels]`."""

    latent_channels: int = 8
    dit: DiTConfig = field(default_factory=DiTConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)


class TimestepEmbedder(nn.Module):
    """t `[B]` in [0, 1] -> `[B, channels]`: sinusoids of 1000 t (256 frequencies) -> MLP."""

    def __init__(self, channels: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))


class CrossAttention(nn.Module):
    """Rows `[N, C]` of B items (item index `[N]`) attend to the tokens `[B, T, D]` of their item."""

    def __init__(self, channels: int, context_channels: int, num_heads: int, qk_rms_norm: bool):
        super().__init__()
        self.heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)
        d = channels // num_heads
        self.q_norm = nn.RMSNorm(d, eps=1e-6) if qk_rms_norm else None
        self.k_norm = nn.RMSNorm(d, eps=1e-6) if qk_rms_norm else None

    def forward(self, h: torch.Tensor, x: SparseTensor, context: torch.Tensor) -> torch.Tensor:
        n, c = h.shape
        b, t, _ = context.shape
        d = c // self.heads
        item, row = _rows(x)
        longest = int(x.batch_counts.max()) if n else 0
        q = self.to_q(h)
        padded = q.new_zeros(b, longest, c)
        padded[item, row] = q
        q = padded.view(b, longest, self.heads, d)
        k, v = self.to_kv(context.to(q.dtype)).view(b, t, 2, self.heads, d).unbind(2)
        if self.q_norm is not None:
            q, k = qk_norm(self.q_norm, q), qk_norm(self.k_norm, k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out(out.transpose(1, 2).reshape(b, longest, c)[item, row])


def _rows(x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(item `[N]`, row within its item `[N]`) of each voxel, int64 (cached on the structure)."""

    def compute():
        item = x.coords[:, 0].long()
        return item, torch.arange(len(x), device=x.device) - x.batch_offsets[item]

    return x.cache.get_or_compute("dit_rows", compute)


class ModulatedBlock(nn.Module):
    """adaLN-Zero DiT block on sparse voxels with cross-attention; feats `[N, C]`, emb `[B, C]`, tokens `[B, T, D]`."""

    def __init__(self, channels: int, context_channels: int, num_heads: int, *, window_size: int, shift: int,
                 mlp_ratio: float, qk_rms_norm: bool, use_checkpoint: bool):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseWindowAttention(channels, num_heads, window_size=window_size, shift=shift,
                                          qk_rms_norm=qk_rms_norm)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.cross = CrossAttention(channels, context_channels, num_heads, qk_rms_norm)
        self.norm3 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def _forward(self, feats: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, x: SparseTensor):
        item, _ = _rows(x)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(emb)[item].chunk(6, dim=1)
        h = self.norm1(feats) * (1 + scale1) + shift1
        feats = feats + gate1 * self.attn(x.replace(h)).feats
        feats = feats + self.cross(self.norm2(feats), x, context)
        h = self.norm3(feats) * (1 + scale2) + shift2
        return feats + gate2 * self.mlp(h)

    def forward(self, x: SparseTensor, emb: torch.Tensor, context: torch.Tensor) -> SparseTensor:
        window_partition(x, self.attn.window_size, self.attn.shift)  # cache outside the checkpointed region
        _rows(x)
        if self.use_checkpoint and torch.is_grad_enabled():
            return x.replace(checkpoint(self._forward, x.feats, emb, context, x, use_reentrant=False))
        return x.replace(self._forward(x.feats, emb, context, x))


class SparseDiT(nn.Module):
    """Input linear + position embedding -> modulated blocks -> LayerNorm + output linear (zero init).

    x: SparseTensor `[N, in_channels]`, t `[B]`, context `[B, T, D]` -> SparseTensor `[N, in_channels]`.
    `window_size` / `shifted`: the attention windows (shift window_size // 2 on odd blocks when shifted).
    """

    def __init__(self, config: DiTConfig, in_channels: int, context_channels: int, *, window_size: int,
                 shifted: bool):
        super().__init__()
        c = config
        self.input_layer = nn.Linear(in_channels, c.channels)
        self.t_embedder = TimestepEmbedder(c.channels)
        self.pos_embedder = {
            "absolute": lambda: AbsolutePositionEmbedder(c.channels),
            "window": lambda: WindowPositionEmbedder(c.channels, window_size),
            "none": lambda: None,
        }[c.pos_embedding]()
        self.blocks = nn.ModuleList(
            ModulatedBlock(c.channels, context_channels, c.channels // c.head_channels, window_size=window_size,
                           shift=(window_size // 2) * (i % 2) if shifted else 0, mlp_ratio=c.mlp_ratio,
                           qk_rms_norm=c.qk_rms_norm, use_checkpoint=c.use_checkpoint)
            for i in range(c.blocks)
        )
        self.out_norm = nn.LayerNorm(c.channels, elementwise_affine=False, eps=1e-6)
        self.out_layer = nn.Linear(c.channels, in_channels)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, x: SparseTensor, t: torch.Tensor, context: torch.Tensor) -> SparseTensor:
        h = self.input_layer(x.feats)
        if self.pos_embedder is not None:
            h = h + self.pos_embedder(x.coords[:, 1:]).to(h.dtype)
        emb = self.t_embedder(t)
        h = x.replace(h)
        for block in self.blocks:
            h = block(h, emb, context)
        return h.replace(self.out_layer(self.out_norm(h.feats)))


class _FlowModel(nn.Module):
    """What both flow models share: the image encoder, the data normalisation buffers and their calibration."""

    def __init__(self, image: ImageEncoderConfig, channels: int):
        super().__init__()
        self.image_encoder = build_image_encoder(image)
        self.image_size = image.image_size
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def encode_condition(self, images: torch.Tensor) -> torch.Tensor:
        """images `[B, 3, H, W]` in [0, 1] -> tokens `[B, T, D]` (resized to the encoder's size first)."""
        return self.image_encoder(resize_images(images, self.image_size))

    @torch.no_grad()
    def calibrate(self, rows: torch.Tensor) -> None:
        """Set mean / std per channel from latent rows `[M, C]` (averaged over torch.distributed ranks), once."""
        if bool(self.calibrated):
            return
        rows = rows.float()
        stats = torch.stack([rows.mean(0), rows.square().mean(0)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
            stats /= torch.distributed.get_world_size()
        self.mean.copy_(stats[0])
        self.std.copy_((stats[1] - stats[0].square()).clamp_min(1e-8).sqrt())
        self.calibrated.fill_(True)

    def normalize(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)

    def denormalize(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return x * self.std.view(shape).to(x.dtype) + self.mean.view(shape).to(x.dtype)


class StructureFlow(_FlowModel):
    """Velocity of the normalised dense structure latent: `[B, C, G, G, G]`, t `[B]`, tokens -> `[B, C, G, G, G]`."""

    def __init__(self, config: StructureFlowConfig):
        super().__init__(config.image, config.latent_channels)
        self.config = config
        self.dit = SparseDiT(config.dit, config.latent_channels, self.image_encoder.out_channels,
                             window_size=config.resolution, shifted=False)

    def _grid(self, batch_size: int, device) -> SparseTensor:
        """Every cell of B grids as sparse voxels (sorted: batch, x, y, z), cached per (B, device)."""
        key = (batch_size, str(device))
        cache = self.__dict__.setdefault("_grids", {})
        if key not in cache:
            g = self.config.resolution
            cells = torch.stack(torch.meshgrid(*[torch.arange(n, device=device) for n in (batch_size, g, g, g)],
                                               indexing="ij"), -1).reshape(-1, 4).to(torch.int32)
            cache[key] = SparseTensor(cells, cells.new_zeros(len(cells), 0), batch_size=batch_size, resolution=g)
        return cache[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, g = x.shape[0], x.shape[1], x.shape[2]
        grid = self._grid(b, x.device)
        out = self.dit(grid.replace(x.permute(0, 2, 3, 4, 1).reshape(-1, c)), t, context).feats
        return out.view(b, g, g, g, c).permute(0, 4, 1, 2, 3)


class LatentFlow(_FlowModel):
    """Velocity of the normalised structured latent: SparseTensor `[N, C]`, t `[B]`, tokens -> SparseTensor."""

    def __init__(self, config: LatentFlowConfig):
        super().__init__(config.image, config.latent_channels)
        self.config = config
        self.dit = SparseDiT(config.dit, config.latent_channels, self.image_encoder.out_channels,
                             window_size=config.dit.window_size, shifted=True)

    def forward(self, x: SparseTensor, t: torch.Tensor, context: torch.Tensor) -> SparseTensor:
        return self.dit(x, t, context)
