"""Training losses of the paper (Eq. 2, 3, 5, 6, 7) and their combiner `vae_loss`.

Render supervision (Eq. 3): depth, normal and mask images and SSIM (+ LPIPS when local weights are given) on
normal images, comparing a prediction and the ground truth rendered with the same camera
(`focusing.render.render_mesh` output: depth [B, H, W], normal [B, H, W, 3], mask [B, H, W]).
Regularisers: sparse total variation on corner SDFs (Eq. 6), the TSDF warm-up (Eq. 5), the FlexiCubes term
L_flex (Eq. 2: shared-corner consistency, L_dev, mean |weights|), occupancy BCE of the self-pruning upsamplers,
KL of the latent.

Every loss returns a scalar tensor averaged over its elements (the paper writes sums; means keep the weights
independent of image size and voxel count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from focusing.sparse.lookup import find_voxels

FULL_COVERAGE = 1 - 1e-4
"""Antialiased mask value above which a pixel is not a silhouette blend (depth/normal losses use only these)."""


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, H, W] over `valid` [B, H, W] bool (0 when nothing is valid, still differentiable)."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


def depth_smooth_l1(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, beta: float) -> torch.Tensor:
    """L_d as TRELLIS writes it: mean smooth-L1 (quadratic below `beta`, e.g. 1 / (2R)) over `valid` pixels."""
    return _masked_mean(F.smooth_l1_loss(pred, gt, reduction="none", beta=beta), valid)


def depth_l1(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_d: mean |depth_pred - depth_gt| over `valid` pixels (both covered; silhouettes are the mask's job).

    pred, gt: [B, H, W] positive camera-space depth (0 = background); valid: [B, H, W] bool.
    """
    return _masked_mean((pred - gt).abs(), valid)


def normal_l1(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_n: mean over `valid` pixels of the L1 distance (summed over xyz) of unit normals [B, H, W, 3]."""
    return _masked_mean((pred - gt).abs().sum(-1), valid)


def mask_l1(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """L_m: mean |mask_pred - mask_gt| over all pixels; masks [B, H, W] in [0, 1] (antialiased coverage)."""
    return (pred - gt).abs().mean()


def normal_ssim(pred: torch.Tensor, gt: torch.Tensor, pred_mask: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """L_ss: 1 - SSIM of the normal images mapped to colours ((n + 1) / 2 on the mask, 0 off it).

    pred, gt: [B, H, W, 3]; masks [B, H, W]. Uses `pytorch_msssim.ssim` (11x11 Gaussian window, range 1).
    """
    from pytorch_msssim import ssim

    return 1 - ssim(normal_image(pred, pred_mask), normal_image(gt, gt_mask), data_range=1.0, size_average=True)


def normal_image(normal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normals [B, H, W, 3] as colours [B, 3, H, W]: (n + 1) / 2 on the mask [B, H, W], 0 off it."""
    return ((normal + 1) * 0.5 * mask[..., None]).permute(0, 3, 1, 2)


def corner_neighbors(corners: torch.Tensor) -> torch.Tensor:
    """[M, 3] int64: index of the +x, +y, +z neighbour of each corner [M, 4] in `corners`, -1 where absent."""
    query = corners[:, None, :].to(torch.int64).repeat(1, 3, 1)
    query[:, :, 1:] += torch.eye(3, dtype=torch.int64, device=corners.device)
    return find_voxels(query.reshape(-1, 4), corners).reshape(-1, 3)


def sparse_tv(values: torch.Tensor, neighbors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L_tv (Eq. 6): mean over corners d of sqrt(∇x(d)² + ∇y(d)² + ∇z(d)²).

    values: [M] corner SDF (any unit; `fit` uses voxel units, s · R); neighbors: [M, 3] from `corner_neighbors`.
    ∇a(d) = s(d + e_a) - s(d), taken as 0 where the neighbouring corner is not in the sparse set. `eps` keeps
    the gradient finite where all differences vanish.
    """
    if len(values) == 0:
        return values.sum()
    present = neighbors >= 0
    # index_select: its backward is an index_add (advanced indexing's sorts the ~3M indices at 1024^3: 40 ms)
    ahead = values.index_select(0, neighbors.clamp(min=0).reshape(-1)).view(neighbors.shape)
    diff = torch.where(present, ahead - values[:, None], torch.zeros_like(values[:, None]))
    return torch.sqrt(diff.square().sum(1) + eps).mean()


def tsdf_loss(corner_sdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_tsdf (Eq. 5): mean |s_j - s_j^raw| over corners; target from `focusing.data.tsdf.corner_tsdf`.

    Both [M], same units and sign (negative inside). Used only during the first steps (warm-up).
    """
    return (corner_sdf - target).abs().mean()


def flex_loss(result) -> torch.Tensor:
    """L_flex (Eq. 2): FlexiCubes' L_dev plus the shared-corner consistency term, from a `SparseFlexResult`."""
    return result.dev_loss + result.consistency


def flex_weights_loss(alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Mean |raw FlexiCubes weight| over voxels (α [N, 8], β [N, 12], γ [N]): pulls toward uniform weights."""
    if alpha.numel() == 0:
        return alpha.sum()
    return torch.cat([alpha.reshape(-1), beta.reshape(-1), gamma.reshape(-1)]).abs().mean()


def occupancy_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_occ of one self-pruning upsampler: mean BCE of child logits [M] against GT occupancy [M] bool."""
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


class LPIPS(torch.nn.Module):
    """LPIPS (Zhang et al. 2018, VGG-16 variant) from a local safetensors file; nothing is downloaded.

    The file holds the VGG-16 conv layers as `features.{i}.weight/bias` (i in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21,
    24, 26, 28: torchvision's names) and the five LPIPS heads as `lin{k}.weight` [1, C_k, 1, 1]. Images
    [B, 3, H, W] in [0, 1]; returns the mean distance over the batch. Frozen.
    """

    LAYERS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    TAPS = (2, 7, 14, 21, 28)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    POOL_BEFORE = (5, 10, 17, 24)
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, path):
        super().__init__()
        from safetensors.torch import load_file

        from focusing.errors import InputError

        try:
            state = load_file(str(path))
        except Exception as exc:  # a missing or unreadable file is the user's input error
            raise InputError(path, f"cannot read LPIPS weights ({type(exc).__name__}: {exc})") from None
        missing = [f"features.{i}.weight" for i in self.LAYERS if f"features.{i}.weight" not in state]
        missing += [f"lin{k}.weight" for k in range(5) if f"lin{k}.weight" not in state]
        if missing:
            raise InputError(path, f"not LPIPS VGG-16 weights: missing {missing[0]} (and {len(missing) - 1} more)")
        self.convs = torch.nn.ModuleDict()
        for i in self.LAYERS:
            w = state[f"features.{i}.weight"]
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(state[f"features.{i}.bias"])
            self.convs[str(i)] = conv
        self.lins = torch.nn.ParameterList([torch.nn.Parameter(state[f"lin{k}.weight"]) for k in range(5)])
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, taps = (x * 2 - 1 - self.shift) / self.scale, []
        for i in self.LAYERS:
            if i in self.POOL_BEFORE:
                h = F.max_pool2d(h, 2)
            h = F.relu(self.convs[str(i)](h))
            if i in self.TAPS:
                taps.append(h)
        return taps

    def forward(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        total = pred.new_zeros(())
        for lin, a, b in zip(self.lins, self.features(pred), self.features(gt)):
            a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((a - b).square(), lin.to(a.dtype)).mean()
        return total


@dataclass
class LossConfig:
    """Weights of Eq. 7 (defaults: TRELLIS's mesh-decoder weights, which the paper uses, plus λ5, λ6)."""

    mask: float = 1.0  # L1 on the antialiased mask
    depth: float = 10.0  # smooth-L1 on depth (normalised units) over pixels covered in both images
    depth_beta_voxels: float = 0.5  # smooth-L1 beta = this / R (TRELLIS: 1 / (2R))
    normal: float = 1.0  # L1 on camera-facing world normals
    ssim: float = 0.2  # 1 - SSIM on normal images
    lpips: float = 0.2  # LPIPS on normal images, only when lpips_weights is given
    lpips_weights: str | None = None  # local safetensors file of LPIPS VGG-16 weights (see `LPIPS`)
    kl: float = 1e-6
    occupancy: float = 1.0  # BCE of each self-pruning upsampler (R/2 and R)
    consistency: float = 1.0  # FlexiCubes shared-corner consistency
    dev: float = 0.5  # FlexiCubes L_dev
    flex_weights: float = 0.2  # mean |raw alpha, beta, gamma|
    tv: float = 1e-3  # λ5, sparse TV on corner SDFs (voxel units)
    tsdf: float = 1.0  # λ6, TSDF warm-up (voxel units)
    tsdf_steps: int = 12000  # the warm-up lasts this many steps
    tsdf_truncation_voxels: float = 3.0


def vae_loss(cfg: LossConfig, *, pred, gt, result, decoded, posterior, tsdf_target=None, lpips=None):
    """Eq. 7: (total, terms). pred / gt: `RenderOutput`s of the same cameras [B, H, W]; result: the decoded
    `SparseFlexResult` at R; decoded: the `DecoderOutput` (raw head outputs, occupancy of both upsamplers);
    posterior: the encoder's `Posterior`; tsdf_target: [M] TSDF at `result.corners` (normalised units) during
    the warm-up, else None; lpips: an `LPIPS` module or None. Every term is returned (unweighted) in `terms`.
    """
    R = decoded.resolution
    terms: dict[str, torch.Tensor] = {}
    gt_full = gt.mask >= FULL_COVERAGE
    valid = gt_full & (pred.mask.detach() >= FULL_COVERAGE)
    terms["mask"] = mask_l1(pred.mask, gt.mask)
    terms["depth"] = depth_smooth_l1(pred.depth, gt.depth, valid, cfg.depth_beta_voxels / R)
    terms["normal"] = normal_l1(pred.normal, gt.normal, valid)
    terms["ssim"] = normal_ssim(pred.normal, gt.normal, pred.mask, gt.mask)
    if lpips is not None and cfg.lpips:
        terms["lpips"] = lpips(normal_image(pred.normal, pred.mask), normal_image(gt.normal, gt.mask))
    terms["kl"] = posterior.kl()
    terms["occupancy"] = sum(occupancy_bce(u.logits, u.target) for u in decoded.upsample if u.target is not None)
    terms["consistency"] = result.consistency
    terms["dev"] = result.dev_loss
    terms["flex_weights"] = flex_weights_loss(decoded.alpha, decoded.beta, decoded.gamma)
    corner_sdf = result.corner_sdf * R
    terms["tv"] = sparse_tv(corner_sdf, corner_neighbors(result.corners))
    if tsdf_target is not None:
        terms["tsdf"] = tsdf_loss(corner_sdf, tsdf_target * R)
    total = sum(getattr(cfg, name) * value for name, value in terms.items())
    return total, terms
