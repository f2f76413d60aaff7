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


def test_depth_smooth_l1_is_quadratic_below_beta_and_linear_above():
    from focusing.losses import depth_smooth_l1

    valid = torch.tensor([[[True, True, False]]])
    gt = torch.zeros(1, 1, 3)
    pred = torch.tensor([[[0.001, 0.5, 100.0]]])  # the third pixel is not valid
    beta = 0.01
    expected = (0.5 * 0.001**2 / beta + (0.5 - 0.5 * beta)) / 2
    assert torch.allclose(depth_smooth_l1(pred, gt, valid, beta), torch.tensor(expected))


def test_occupancy_bce_and_flex_weights():
    from focusing.losses import flex_weights_loss, occupancy_bce

    logits = torch.tensor([2.0, -1.0, 0.0])
    target = torch.tensor([True, False, True])
    expected = -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(1 - torch.sigmoid(torch.tensor(-1.0)))
                 + torch.log(torch.tensor(0.5))) / 3
    assert torch.allclose(occupancy_bce(logits, target), expected)
    a, b, g = torch.full((2, 8), -1.0), torch.full((2, 12), 2.0), torch.zeros(2)
    assert torch.allclose(flex_weights_loss(a, b, g), torch.tensor((16 * 1.0 + 24 * 2.0) / 42))
    assert occupancy_bce(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == 0


def _lpips_file(path, seed=0):
    from safetensors.torch import save_file

    from focusing.losses import LPIPS

    g = torch.Generator().manual_seed(seed)
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    state = {}
    for n, i in enumerate(LPIPS.LAYERS):
        state[f"features.{i}.weight"] = torch.randn(channels[n + 1], channels[n], 3, 3, generator=g) * 0.05
        state[f"features.{i}.bias"] = torch.zeros(channels[n + 1])
    for k, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{k}.weight"] = torch.rand(1, c, 1, 1, generator=g)
    save_file(state, str(path))
    return path


def test_lpips_from_a_local_file(tmp_path):
    from focusing.losses import LPIPS

    lpips = LPIPS(_lpips_file(tmp_path / "lpips.safetensors"))
    assert not any(p.requires_grad for p in lpips.parameters())
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 32, 32, generator=g)
    b = (a + 0.2 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1).requires_grad_()
    assert lpips(a, a).abs() < 1e-6
    d = lpips(b, a)
    assert d > 0
    d.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert lpips(a, (a + 0.4 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1)) > lpips(a, b.detach()) * 0.5


def test_lpips_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    from focusing.errors import InputError
    from focusing.losses import LPIPS

    with pytest.raises(InputError, match="cannot read LPIPS weights"):
        LPIPS(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="missing features.0.weight"):
        LPIPS(tmp_path / "other.safetensors")
