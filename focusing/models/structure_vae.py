"""The sparse-structure VAE (TRELLIS's `SparseStructureEncoder` / `Decoder`, paper §3.5): dense 3D convolutions
compressing the occupancy of the shape VAE's latent grid, e.g. 64^3 (R = 256) -> 16^3 x 8.

    model = StructureVAE(StructureVAEConfig())                   # 64^3 -> 16^3 x 8, channels 32 / 128 / 512
    post = model.encode(occupancy)                                 # occupancy [B, 1, 64, 64, 64] in {0, 1}
    logits = model.decode(post.sample(generator))                  # [B, 1, 64, 64, 64]; occupied where > 0
    coords = occupied_coords(logits)                               # [N, 4] int32 (batch, x, y, z), sorted

Encoder: conv 3^3 -> per level `num_res_blocks` residual blocks, then a stride-2 conv to the next level's
channels (len(channels) - 1 halvings) -> `middle_blocks` residual blocks -> GroupNorm, SiLU, conv 3^3 to the
mean and log-variance of `latent_channels`. Decoder: the mirror image; each doubling is a conv to 8x the
channels and a 3D pixel shuffle. Residual blocks: GroupNorm, SiLU, conv 3^3, twice (the second conv starts at
zero), a 1^3 conv on the skip when the width changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from focusing.models.vae import Posterior


@dataclass
class StructureVAEConfig:
    """Architecture of a `StructureVAE` (defaults: TRELLIS's 64^3 -> 16^3 x 8)."""

    resolution: int = 64  # the occupancy grid (the shape VAE's latent grid, R / 4)
    latent_channels: int = 8
    channels: tuple[int, ...] = (32, 128, 512)  # encoder widths per level, fine to coarse; the decoder mirrors
    num_res_blocks: int = 2
    middle_blocks: int = 2
    use_checkpoint: bool = False  # gradient checkpointing of the residual blocks

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if len(self.channels) < 1:
            raise ValueError("channels needs at least one level")
        factor = 2 ** (len(self.channels) - 1)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by 2^{len(self.channels) - 1}")

    @property
    def latent_resolution(self) -> int:
        """The latent grid G: resolution / 2^(levels - 1)."""
        return self.resolution // 2 ** (len(self.channels) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock3d(nn.Module):
    """[B, C_in, D, H, W] -> [B, C_out, D, H, W]."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1, self.conv1 = _norm(channels), nn.Conv3d(channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_channels), nn.Conv3d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv3d(channels, out_channels, 1) if out_channels != channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Upsample3d(nn.Module):
    """[B, C_in, D, H, W] -> [B, C_out, 2D, 2H, 2W]: conv to 8 C_out channels, then a 3D pixel shuffle."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Conv3d(channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = x.shape
        y = self.conv(x).view(b, self.out_channels, 2, 2, 2, d, h, w)
        return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_channels, 2 * d, 2 * h, 2 * w)


def _run(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled() and isinstance(block, ResBlock3d):
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class StructureVAE(nn.Module):
    """Occupancy `[B, 1, N, N, N]` <-> latent `[B, latent_channels, G, G, G]` (see the module docstring)."""

    def __init__(self, config: StructureVAEConfig):
        super().__init__()
        self.config = c = config
        ch = c.channels
        enc: list[nn.Module] = []
        for i, width in enumerate(ch):
            enc += [ResBlock3d(width) for _ in range(c.num_res_blocks)]
            if i + 1 < len(ch):
                enc.append(nn.Conv3d(width, ch[i + 1], 2, stride=2))
        enc += [ResBlock3d(ch[-1]) for _ in range(c.middle_blocks)]
        self.encoder_in = nn.Conv3d(1, ch[0], 3, padding=1)
        self.encoder = nn.ModuleList(enc)
        self.encoder_out = nn.Sequential(_norm(ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], 2 * c.latent_channels, 3,
                                                                              padding=1))
        rev = ch[::-1]
        dec: list[nn.Module] = [ResBlock3d(rev[0]) for _ in range(c.middle_blocks)]
        for i, width in enumerate(rev):
            dec += [ResBlock3d(width) for _ in range(c.num_res_blocks)]
            if i + 1 < len(rev):
                dec.append(Upsample3d(width, rev[i + 1]))
        self.decoder_in = nn.Conv3d(c.latent_channels, rev[0], 3, padding=1)
        self.decoder = nn.ModuleList(dec)
        self.decoder_out = nn.Sequential(_norm(rev[-1]), nn.SiLU(), nn.Conv3d(rev[-1], 1, 3, padding=1))

    def encode(self, occupancy: torch.Tensor) -> Posterior:
        """occupancy `[B, 1, N, N, N]` (float, 0 / 1) -> Posterior with mean, logvar `[B, C, G, G, G]` (>= fp32)."""
        h = _run(self.encoder, self.encoder_in(occupancy), self.config.use_checkpoint)
        h = self.encoder_out(h)
        mean, logvar = h.to(torch.promote_types(h.dtype, torch.float32)).chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z `[B, C, G, G, G]` -> occupancy logits `[B, 1, N, N, N]`."""
        h = _run(self.decoder, self.decoder_in(z), self.config.use_checkpoint)
        return self.decoder_out(h)


def occupancy_grid(coords: torch.Tensor, batch_size: int, resolution: int) -> torch.Tensor:
    """Sparse voxels `[N, 4]` int32 (batch, x, y, z) -> dense occupancy `[B, 1, R, R, R]` float32 (1 = occupied)."""
    grid = torch.zeros(batch_size, 1, resolution, resolution, resolution, device=coords.device)
    c = coords.long()
    grid[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = 1.0
    return grid


def occupied_coords(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Occupancy logits `[B, 1, R, R, R]` -> the voxels above `threshold`, `[N, 4]` int32 (batch, x, y, z),
    sorted (the SparseTensor order)."""
    return torch.nonzero(logits[:, 0] > threshold).to(torch.int32)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s) over the whole batch, p = sigmoid(logits) (TRELLIS's)."""
    p = torch.sigmoid(logits.float())
    return 1.0 - (2.0 * (p * target).sum() + smooth) / (p.sum() + target.sum() + smooth)
