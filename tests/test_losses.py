"""Losses: render L1 terms, SSIM on normals, sparse TV (Eq. 6), TSDF warm-up (Eq. 5), L_flex."""

import pytest
import torch

from focusing.data.grid import voxel_corners
from focusing.losses import (
    corner_neighbors,
    depth_l1,
    flex_loss,
    mask_l1,
    normal_l1,
    normal_ssim,
    sparse_tv,
    tsdf_loss,
)


def _block(n=4):
    xyz = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int64), xyz], 1).to(torch.int32)


def test_corner_neighbors():
    corners, _ = voxel_corners(_block(2))
    nbr = corner_neighbors(corners)
    for i in range(len(corners)):
        for axis in range(3):
            expect = corners[i].clone()
            expect[1 + axis] += 1
            match = (corners == expect).all(1).nonzero()
            assert nbr[i, axis] == (int(match) if len(match) else -1)


def test_sparse_tv_matches_dense_forward_differences():
    g = torch.Generator().manual_seed(0)
    corners, _ = voxel_corners(_block(4))  # a full 5^3 corner grid
    values = torch.randn(len(corners), generator=g, dtype=torch.float64)
    dense = torch.zeros(5, 5, 5, dtype=torch.float64)
    dense[corners[:, 1].long(), corners[:, 2].long(), corners[:, 3].long()] = values
    grads = []
    for axis in range(3):
        d = torch.diff(dense, dim=axis)
        pad = [0, 0] * 3
        pad[2 * (2 - axis) + 1] = 1  # zero difference past the last corner
        grads.append(torch.nn.functional.pad(d, pad))
    expect = torch.sqrt(sum(gr.square() for gr in grads) + 1e-12).mean()
    assert float(sparse_tv(values, corner_neighbors(corners))) == pytest.approx(float(expect), rel=1e-12)


def test_sparse_tv_is_zero_and_smooth_for_constant_fields():
    corners, _ = voxel_corners(_block(3))
    values = torch.full((len(corners),), 0.7, dtype=torch.float64, requires_grad=True)
    loss = sparse_tv(values, corner_neighbors(corners))
    loss.backward()
    assert float(loss.detach()) < 1e-5 and torch.isfinite(values.grad).all()
    # a unit step between x = 1 and x = 2 costs 1 at each of the 16 corners with x = 1, out of 64
    x = corners[:, 1].double()
    assert float(sparse_tv((x >= 2).double(), corner_neighbors(corners))) == pytest.approx(16 / 64, abs=1e-5)


def test_tsdf_loss_is_mean_absolute_error():
    s = torch.tensor([0.1, -0.2, 0.3])
    t = torch.tensor([0.0, -0.1, 0.5])
    assert float(tsdf_loss(s, t)) == pytest.approx((0.1 + 0.1 + 0.2) / 3)


def test_render_l1_terms():
    depth = torch.rand(2, 8, 8) + 1
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[:, 2:5, 2:5] = True
    assert float(depth_l1(depth + 0.5, depth, valid)) == pytest.approx(0.5)
    assert float(depth_l1(depth, depth * 0, torch.zeros_like(valid))) == 0.0
    n = torch.nn.functional.normalize(torch.randn(2, 8, 8, 3), dim=-1)
    assert float(normal_l1(n, n, valid)) == 0.0
    assert float(normal_l1(-n, n, valid)) == pytest.approx(float((2 * n.abs().sum(-1))[valid].mean()))
    m = valid.float()
    assert float(mask_l1(m, torch.zeros_like(m))) == pytest.approx(18 / 128)


def test_normal_ssim():
    g = torch.Generator().manual_seed(0)
    n = torch.nn.functional.normalize(torch.randn(1, 32, 32, 3, generator=g), dim=-1)
    mask = torch.ones(1, 32, 32)
    assert float(normal_ssim(n, n, mask, mask)) == pytest.approx(0.0, abs=1e-6)
    pred = n.clone().requires_grad_()
    loss = normal_ssim(pred, torch.roll(n, 3, dims=1), mask, mask)
    loss.backward()
    assert float(loss.detach()) > 0.1 and pred.grad.abs().sum() > 0


def test_flex_loss_sums_dev_and_consistency():
    class R:
        dev_loss = torch.tensor(0.25)
        consistency = torch.tensor(0.5)

    assert float(flex_loss(R())) == 0.75
