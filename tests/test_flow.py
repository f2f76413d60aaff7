"""The rectified flow: algebra of the noising, the time grid, guidance, and a 2-D toy that must recover a known
Gaussian mixture (unconditionally and per class) after a short training."""

import math

import pytest
import torch

from focusing.flow import (
    FlowConfig, SamplerConfig, diffuse, drop_condition, euler_sample, flow_loss, guided_velocity, sample_t,
    timesteps, velocity,
)

MEANS = torch.tensor([[-1.5, 0.5], [1.5, -0.5]])
STD = 0.25


class ToyVelocity(torch.nn.Module):
    """v(x [B, 2], t [B], cond [B, 1, 2]) with an MLP; cond is a one-hot class token (zeros: unconditional)."""

    def __init__(self, width=128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 2 + 8, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, x, t, cond):
        freqs = torch.arange(1, 5, dtype=torch.float32) * math.pi
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
        return self.net(torch.cat([x, cond[:, 0], emb], 1))


def _mixture(n, g):
    label = torch.randint(0, 2, (n,), generator=g)
    return MEANS[label] + STD * torch.randn(n, 2, generator=g), label


@pytest.fixture(scope="module")
def toy_model():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = ToyVelocity()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    cfg = FlowConfig()
    for step in range(1500):
        x0, label = _mixture(256, g)
        cond = torch.nn.functional.one_hot(label, 2).float()[:, None]
        loss, _ = flow_loss(model, x0, cond, cfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


def test_diffuse_endpoints_and_velocity():
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    s = 1e-5
    assert torch.allclose(diffuse(x0, torch.zeros(3), eps, s), x0 + s * eps)
    assert torch.allclose(diffuse(x0, torch.ones(3), eps, s), eps)
    # the target is the time derivative of x_t
    t, h = torch.full((3,), 0.3, dtype=torch.float64), 1e-6
    x0, eps = x0.double(), eps.double()
    numeric = (diffuse(x0, t + h, eps, s) - diffuse(x0, t - h, eps, s)) / (2 * h)
    assert torch.allclose(numeric, velocity(x0, eps, s), atol=1e-8)


def test_t_schedule_and_grid():
    g = torch.Generator().manual_seed(1)
    t = sample_t(20000, FlowConfig(), g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 1.0) < 0.03 and abs(logit.std() - 1.0) < 0.03
    grid = timesteps(SamplerConfig(steps=25, rescale_t=3.0))
    assert len(grid) == 26 and grid[0] == 1.0 and grid[-1] == 0.0
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert timesteps(SamplerConfig(steps=2, rescale_t=3.0)) == pytest.approx([1.0, 0.75, 0.0])  # 3 u / (1 + 2 u)
    assert timesteps(SamplerConfig(steps=4, rescale_t=1.0)) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_drop_condition_rate():
    g = torch.Generator().manual_seed(2)
    cond = torch.ones(10000, 3, 2)
    kept, dropped = drop_condition(cond, 0.1, g)
    assert abs(dropped.float().mean() - 0.1) < 0.01
    assert torch.equal(kept[dropped], torch.zeros_like(kept[dropped]))
    assert torch.equal(kept[~dropped], cond[~dropped])


def test_cfg_weight_one_is_conditional_and_interval():
    calls = []

    def predict(x, t, cond):
        calls.append(float(cond.abs().sum()))
        return x * 0 + cond[:, :1, :1].reshape(-1, 1) * 2.0 + 1.0  # v_cond = 3, v_uncond = 1

    x, cond = torch.zeros(2, 1), torch.ones(2, 1, 1)
    assert torch.equal(guided_velocity(predict, x, 0.7, cond, SamplerConfig(cfg=1.0)), torch.full((2, 1), 3.0))
    assert len(calls) == 1
    w = SamplerConfig(cfg=4.0, cfg_interval=(0.5, 1.0))
    assert torch.equal(guided_velocity(predict, x, 0.7, cond, w), torch.full((2, 1), 1.0 + 4.0 * 2.0))
    assert torch.equal(guided_velocity(predict, x, 0.3, cond, w), torch.full((2, 1), 3.0))  # outside: conditional


def test_euler_integrates_a_constant_velocity_exactly():
    noise = torch.randn(5, 3)
    out = euler_sample(lambda x, t, c: torch.full_like(x, 2.0), noise, torch.zeros(5, 1, 1),
                       SamplerConfig(steps=7, cfg=1.0))
    assert torch.allclose(out, noise - 2.0, atol=1e-6)


def test_toy_recovers_the_mixture(toy_model):
    n = 4000
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(n, 2, generator=g)
    for k in range(2):  # conditional on class k (w = 1): that Gaussian
        cond = torch.nn.functional.one_hot(torch.full((n,), k), 2).float()[:, None]
        x = euler_sample(toy_model, noise, cond, SamplerConfig(steps=25, cfg=1.0))
        assert torch.allclose(x.mean(0), MEANS[k], atol=0.05), x.mean(0)
        assert torch.allclose(x.std(0), torch.full((2,), STD), atol=0.07), x.std(0)
        guided = euler_sample(toy_model, noise, cond, SamplerConfig(steps=25, cfg=3.0))
        assert (torch.cdist(guided, MEANS).argmin(1) == k).float().mean() > 0.97
    # unconditional (the null condition, trained on 10% of the steps): both modes, half each
    x = euler_sample(toy_model, noise, torch.zeros(n, 1, 2), SamplerConfig(steps=25, cfg=1.0))
    near = torch.cdist(x, MEANS).argmin(1)
    assert abs(near.float().mean() - 0.5) < 0.06
    assert (x[:, 0] * near.float().mul(2).sub(1) > 0.5).float().mean() > 0.7  # mostly off the middle


def test_sampling_is_deterministic_under_a_seed(toy_model):
    def run(seed):
        noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(seed))
        return euler_sample(toy_model, noise, torch.zeros(64, 1, 2), SamplerConfig(steps=10))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_flow_loss_rows_of_items_share_t():
    seen = {}

    def predict(x, t, cond):
        seen["t"] = t
        return torch.zeros_like(x)

    x0 = torch.randn(7, 3)
    item = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    loss, logs = flow_loss(predict, x0, torch.ones(3, 2, 4), FlowConfig(p_uncond=0.0), torch.Generator(), item)
    assert seen["t"].shape == (3,) and torch.isfinite(loss) and float(logs["flow/uncond"]) == 0.0
