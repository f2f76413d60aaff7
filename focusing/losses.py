"""Training losses of the paper (Eq. 2, 3, 5, 6, 7).

Render supervision (Eq. 3): L1 on depth, normal and mask images, and SSIM on normal images, comparing a
prediction and the ground truth rendered with the same camera (`focusing.render.render_mesh` output:
depth [B, H, W], normal [B, H, W, 3], mask [B, H, W]). LPIPS on normals is not here (it needs network weights).
Regularisers: sparse total variation on corner SDFs (Eq. 6), the TSDF warm-up (Eq. 5) and the FlexiCubes term
L_flex (Eq. 2; L_dev plus the shared-corner consistency, both computed by `sparseflex_mesh`).

Every loss returns a scalar tensor averaged over its elements (the paper writes sums; means keep the weights
independent of image size and voxel count).
"""

from __future__ import annotations

import torch

from focusing.sparse.lookup import find_voxels


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, H, W] over `valid` [B, H, W] bool (0 when nothing is valid, still differentiable)."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


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

    def image(normal, mask):
        return ((normal + 1) * 0.5 * mask[..., None]).permute(0, 3, 1, 2)

    return 1 - ssim(image(pred, pred_mask), image(gt, gt_mask), data_range=1.0, size_average=True)


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
    diff = torch.where(present, values[neighbors.clamp(min=0)] - values[:, None], torch.zeros_like(values[:, None]))
    return torch.sqrt(diff.square().sum(1) + eps).mean()


def tsdf_loss(corner_sdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_tsdf (Eq. 5): mean |s_j - s_j^raw| over corners; target from `focusing.data.tsdf.corner_tsdf`.

    Both [M], same units and sign (negative inside). Used only during the first steps (warm-up).
    """
    return (corner_sdf - target).abs().mean()


def flex_loss(result) -> torch.Tensor:
    """L_flex (Eq. 2): FlexiCubes' L_dev plus the shared-corner consistency term, from a `SparseFlexResult`."""
    return result.dev_loss + result.consistency
