"""The Focusing VAE (paper §3.4, Fig. 3): oriented points -> structured latent at R/4 -> SparseFlex mesh at R.

    model = FocusingVAE(VAEConfig(...))
    post = model.encode(points, normals, point_batch, latent_coords)    # Posterior on the latent voxels
    z = post.sample(generator) if training else post.mean               # SparseTensor [N0, 8] at R/4
    z = z.select(keep)                                                  # carving / zooming (focusing.carving)
    out = model.decode(z, targets=(voxels_mid, voxels))                 # DecoderOutput at R
    mesh = out.mesh(training=True)                                      # SparseFlexResult

Encoder: the local PointNet pools the oriented points of each latent voxel (offset to the voxel centre in
voxel units, normal) -> sparse Swin transformer -> per-voxel mean and log-variance of z (`latent_channels`).
Decoder: sparse Swin transformer on the (carved) latent voxels -> two self-pruning 2x upsamplers (children kept
by the GT occupancy in training, by the occupancy logits at inference; paper §3.4) -> SparseFlex head at R.

SparseFlex head (TripoSF's): 53 channels per voxel at R = 8 corner SDFs, 8 x 3 corner deformations, 12 beta,
8 alpha, 1 gamma. The SDF is `raw * 4 / R - 1 / R` in normalised units (one raw unit = one latent voxel; zero
is a quarter voxel inside); deformation, alpha, beta, gamma are passed raw to `sparseflex_mesh`, which maps
them to (1 / (2R)) tanh(delta), 0.99 tanh + 1 and 0.99 sigmoid + 0.005 and averages shared corners. The SDF
rows start at PyTorch's default init, so a fresh model already extracts a (random) surface inside the decoded
voxels; the deformation and weight rows start at zero (undeformed grid, uniform weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from focusing.models.pointnet import LocalPointNet
from focusing.models.transformer import SparseTransformer
from focusing.models.upsample import KEEP_LOGIT, SelfPruningUpsample, UpsampleOutput
from focusing.sparse.gather import select_rows
from focusing.sparse.tensor import SparseTensor
from focusing.sparseflex.extract import SparseFlexResult, sparseflex_mesh

HEAD_CHANNELS = 53  # 8 sdf + 24 deformation + 12 beta + 8 alpha + 1 gamma
LATENT_FACTOR = 4  # output resolution / latent resolution (two 2x upsamplers)


@dataclass
class VAEConfig:
    """Architecture of a `FocusingVAE`; the defaults are the `B` anchor (TripoSF's released 1024 model)."""

    latent_channels: int = 8
    pointnet_channels: int = 1024  # per-voxel PointNet feature (TripoSF: 6 -> 1024, hidden 256, 5 blocks)
    pointnet_hidden: int = 256
    pointnet_blocks: int = 5
    encoder_channels: int = 768
    encoder_blocks: int = 12
    decoder_channels: int = 768
    decoder_blocks: int = 12
    head_channels: int = 64  # attention head width: heads = channels // head_channels
    mlp_ratio: float = 4.0
    window_size: int = 8
    pos_embedding: str = "absolute"  # "absolute" (TripoSF's APE), "window" (position inside the window), "none"
    qk_rms_norm: bool = False
    upsample_channels: tuple[int, int] = (192, 96)
    upsample_res_blocks: int = 1
    use_checkpoint: bool = False  # gradient checkpointing of the transformer blocks
    pointnet_chunk: int = 0  # points per checkpointed PointNet chunk of whole voxels (0: one pass; same result)
    block_chunk: int = 0  # voxels per checkpointed chunk of whole windows in each block (0: whole block; same result)
    block_group: int = 0  # blocks per outer checkpoint over the blocks (0: none; less memory, one more forward)
    block_offload: bool = False  # the block_group runs' inputs wait in host memory for the backward (same result)
    stream_dtype: str = "float32"  # the residual stream between blocks: "float32" or "autocast" (bf16 under AMP)
    store_rows: int = 0  # per transformer: voxel-blocks of activations kept, not recomputed (0: none; same result)
    freeze_pointnet: bool = False  # keep the PointNet fixed (e.g. after pre-training it with the rest)
    resolution: int = 1024  # output resolution the model is trained for (the default of `reconstruct`)

    def __post_init__(self):
        self.upsample_channels = tuple(self.upsample_channels)
        for name in ("encoder_channels", "decoder_channels"):
            if getattr(self, name) % self.head_channels:
                raise ValueError(f"{name} {getattr(self, name)} is not a multiple of head_channels "
                                 f"{self.head_channels}")
        if len(self.upsample_channels) != 2:
            raise ValueError(f"upsample_channels needs 2 entries (R/2, R), got {self.upsample_channels}")
        if self.store_rows and (self.block_offload or self.block_group > 1):
            raise ValueError("store_rows does not combine with block_group / block_offload (their runs recompute)")
        if self.block_offload and self.block_group < 1:
            raise ValueError("block_offload needs block_group >= 1 (the runs of blocks whose inputs go to host memory)")
        if self.resolution % LATENT_FACTOR:
            raise ValueError(f"resolution must be a multiple of {LATENT_FACTOR}, got {self.resolution}")


@dataclass
class Posterior:
    """Diagonal Gaussian over the latent: mean `[N, C]` on the latent voxels (a SparseTensor), logvar `[N, C]`;
    or a dense mean tensor and logvar of one shape (the sparse-structure VAE's `[B, C, G, G, G]`)."""

    mean: SparseTensor | torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> SparseTensor | torch.Tensor:
        """Reparametrised sample mean + exp(logvar / 2) * eps (differentiable in mean and logvar)."""
        device = generator.device if generator is not None else self.logvar.device
        eps = torch.randn(self.logvar.shape, generator=generator, device=device, dtype=self.logvar.dtype)
        eps = eps.to(self.logvar.device)
        if isinstance(self.mean, torch.Tensor):
            return self.mean + torch.exp(0.5 * self.logvar) * eps
        return self.mean.replace(self.mean.feats + torch.exp(0.5 * self.logvar) * eps)

    def kl(self) -> torch.Tensor:
        """KL to the standard normal, averaged over voxels and channels (TRELLIS's normalisation)."""
        mean = self.mean if isinstance(self.mean, torch.Tensor) else self.mean.feats
        if mean.numel() == 0:
            return mean.sum()
        return 0.5 * torch.mean(mean.square() + self.logvar.exp() - 1.0 - self.logvar)


@dataclass
class DecoderOutput:
    """Per-voxel SparseFlex parameters at the output resolution R.

    coords `[N, 4]` int32 at R; sdf `[N, 8]` normalised units (negative inside); deform `[N, 8, 3]`,
    alpha `[N, 8]`, beta `[N, 12]`, gamma `[N]`: raw values for `sparseflex_mesh`; upsample: the two
    `UpsampleOutput`s (occupancy logits and targets at R/2 and R); keep `[N]` bool: None when every voxel is
    kept, else which are (the others are hole-closing candidates, `FocusingVAE.decode_head`).
    """

    coords: torch.Tensor
    resolution: int
    sdf: torch.Tensor
    deform: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    upsample: list[UpsampleOutput] = field(default_factory=list)
    keep: torch.Tensor | None = None

    FIELDS = ("sdf", "deform", "alpha", "beta", "gamma")

    def select(self, mask: torch.Tensor) -> DecoderOutput:
        """The voxels where `mask` `[N]` is true (their `keep` too; `upsample` is dropped)."""
        fields = (select_rows(getattr(self, f), mask) for f in self.FIELDS)
        return DecoderOutput(self.coords[mask], self.resolution, *fields,
                             keep=None if self.keep is None else self.keep[mask])

    def mesh(self, training: bool) -> SparseFlexResult:
        """Extract the SparseFlex mesh (4-triangle split in training, 2-triangle at inference), >= float32."""
        return sparseflex_mesh(
            self.coords, self.resolution, *(at_least_fp32(t) for t in (self.sdf, self.deform, self.alpha,
                                                                       self.beta, self.gamma)), training=training,
        )


class SparseFlexHead(nn.Module):
    """Features `[N, C]` at R -> the 53 SparseFlex channels, split and scaled (see the module docstring)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.out = nn.Linear(channels, HEAD_CHANNELS)
        with torch.no_grad():  # undeformed grid and uniform weights at the start; SDF rows keep the default init
            self.out.weight[8:].zero_()
            self.out.bias.zero_()

    def forward(self, feats: torch.Tensor, resolution: int):
        h = at_least_fp32(self.out(torch.nn.functional.silu(self.norm(feats))))
        sdf = h[:, :8] * (4.0 / resolution) - 1.0 / resolution
        deform = h[:, 8:32].reshape(-1, 8, 3)
        beta, alpha, gamma = h[:, 32:44], h[:, 44:52], h[:, 52]
        return sdf, deform, alpha, beta, gamma


class FocusingVAE(nn.Module):
    """Encoder (local PointNet + sparse Swin transformer) and decoder (sparse Swin transformer + 2 self-pruning
    upsamplers + SparseFlex head). Resolution-free: the latent grid is whatever the latent coords are on."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.pointnet = LocalPointNet(c.pointnet_channels, c.pointnet_hidden, c.pointnet_blocks,
                                      chunk_points=c.pointnet_chunk)
        common = dict(
            mlp_ratio=c.mlp_ratio, window_size=c.window_size, use_checkpoint=c.use_checkpoint,
            qk_rms_norm=c.qk_rms_norm, pos_embedding=c.pos_embedding, block_chunk=c.block_chunk,
            block_group=c.block_group, block_offload=c.block_offload, stream_dtype=c.stream_dtype,
            store_rows=c.store_rows,
        )
        self.encoder = SparseTransformer(
            c.pointnet_channels, c.encoder_channels, 2 * c.latent_channels, c.encoder_blocks,
            c.encoder_channels // c.head_channels, **common,
        )
        self.decoder = SparseTransformer(
            c.latent_channels, c.decoder_channels, c.decoder_channels, c.decoder_blocks,
            c.decoder_channels // c.head_channels, **common,
        )
        c1, c2 = c.upsample_channels
        self.upsample = nn.ModuleList([
            SelfPruningUpsample(c.decoder_channels, c1, num_res_blocks=c.upsample_res_blocks),
            SelfPruningUpsample(c1, c2, num_res_blocks=c.upsample_res_blocks),
        ])
        self.head = SparseFlexHead(c2)
        if c.freeze_pointnet:
            self.pointnet.requires_grad_(False)

    # ------------------------------------------------------------------ encoder
    def encode(
        self,
        points: torch.Tensor,
        normals: torch.Tensor,
        point_batch: torch.Tensor | None,
        latent_coords: torch.Tensor,
        latent_resolution: int,
        *,
        batch_size: int | None = None,
    ) -> Posterior:
        """points, normals `[P, 3]` (normalised frame), point_batch `[P]` int64 (None: all batch 0),
        latent_coords `[N, 4]` int32 sorted at `latent_resolution` (= R / 4) -> Posterior on those voxels."""
        feats = self.pointnet(points, normals, latent_coords, latent_resolution, point_batch)
        x = SparseTensor(latent_coords, feats, batch_size=batch_size, resolution=latent_resolution)
        h = at_least_fp32(self.encoder(x).feats)
        mean, logvar = h.chunk(2, dim=1)
        return Posterior(x.replace(mean), logvar.clamp(-30.0, 20.0))

    # ------------------------------------------------------------------ decoder
    def decode_features(self, z: SparseTensor) -> SparseTensor:
        """The decoder transformer on the latent voxels: `[N, latent_channels] -> [N, decoder_channels]`."""
        return self.decoder(z)

    def decode_head(
        self,
        h: SparseTensor,
        targets: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_logit: float = KEEP_LOGIT,
        candidate_logit: float | None = None,
    ) -> DecoderOutput:
        """Upsample decoder features `h` (latent grid) twice and apply the SparseFlex head at R = 4 x latent.

        targets: GT occupied voxels `[K1, 4]` at R/2 and `[K2, 4]` at R; in training mode children are kept by
        them (never by the predicted logits), at inference (or without targets) by logits > `keep_logit`.
        candidate_logit (inference, without targets): also return the pruned children at R whose logit exceeds
        it, with `keep` marking the kept ones (the candidates of `focusing.sparseflex.closure.close_holes`).
        """
        if h.resolution is None:
            raise ValueError("decoder features need their latent resolution")
        ups = []
        x = h
        for i, block in enumerate(self.upsample):
            out = block(x, target_coords=None if targets is None else targets[i], keep_logit=keep_logit)
            ups.append(out)
            x = out.x
        keep = None
        if candidate_logit is not None and targets is None:
            rows = out.keep | (out.logits > candidate_logit)
            x, keep = out.children.select(rows), out.keep[rows]
        resolution = h.resolution * LATENT_FACTOR
        sdf, deform, alpha, beta, gamma = self.head(x.feats, resolution)
        return DecoderOutput(x.coords, resolution, sdf, deform, alpha, beta, gamma, ups, keep)

    def decode(self, z: SparseTensor, targets: tuple[torch.Tensor, torch.Tensor] | None = None,
               keep_logit: float = KEEP_LOGIT) -> DecoderOutput:
        """Latent `z` (`[N, latent_channels]` at R/4) -> SparseFlex parameters at R (see `decode_head`)."""
        return self.decode_head(self.decode_features(z), targets, keep_logit)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 if it is in a half type (autocast outputs), else unchanged (float32 / float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))



def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
