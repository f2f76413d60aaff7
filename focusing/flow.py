"""Rectified flow (TRELLIS's `FlowMatchingTrainer` and `FlowEulerGuidanceIntervalSampler`): objective and sampler.

Noising, from data x0 (t = 0) to noise eps (t = 1):

    x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps            sigma_min = 1e-5
    v   = d x_t / dt = (1 - sigma_min) eps - x0                       the network's target (MSE)

Training draws t ~ logitNormal(mean 1, std 1) (t = sigmoid(N(1, 1)); or uniform) and replaces the condition by
the null condition (zeros, TRELLIS's `neg_cond`) with probability p_uncond = 0.1, so one network predicts both
the conditional and the unconditional velocity.

Sampling integrates dx/dt = v from t = 1 (noise) to t = 0 with Euler steps on the grid
t_i = s u_i / (1 + (s - 1) u_i), u_i = linspace(1, 0, steps + 1), s = rescale_t (3: more steps near t = 1).
Classifier-free guidance with weight w inside the interval [lo, hi] of t:

    v = v_uncond + w (v_cond - v_uncond)                              (w = 1: the conditional prediction)

TRELLIS writes the same as (1 + s) v_cond - s v_uncond, so its cfg_strength s is our w = 1 + s; outside the
interval only the conditional prediction is used. The model is called as `predict(x_t, t, cond)` with x_t a
tensor (`[B, ...]`, or the `[N, C]` rows of a sparse latent: the caller wraps them), t `[B]` in [0, 1] (one
per item) and cond `[B, T, D]` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
T_SCHEDULES = ("logit_normal", "uniform")


@dataclass
class FlowConfig:
    """The training side of the rectified flow (TRELLIS's defaults)."""

    sigma_min: float = 1e-5
    t_schedule: str = "logit_normal"  # "logit_normal" (t = sigmoid(N(t_mean, t_std))) or "uniform"
    t_mean: float = 1.0
    t_std: float = 1.0
    p_uncond: float = 0.1  # probability of training a sample on the null condition (for CFG)

    def __post_init__(self):
        if self.t_schedule not in T_SCHEDULES:
            raise ValueError(f"t_schedule must be one of {T_SCHEDULES}, got {self.t_schedule!r}")
        if not 0.0 <= self.sigma_min < 1.0 or self.t_std <= 0 or not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"need 0 <= sigma_min < 1, t_std > 0, 0 <= p_uncond <= 1, got {self.sigma_min}, "
                             f"{self.t_std}, {self.p_uncond}")


@dataclass
class SamplerConfig:
    """The Euler sampler with guidance on an interval of t (TRELLIS's image-to-3D settings; w = 1 + 5)."""

    steps: int = 25
    rescale_t: float = 3.0
    cfg: float = 6.0  # guidance weight w (1: no guidance); TRELLIS's cfg_strength 5 is w = 6
    cfg_interval: tuple[float, float] = (0.5, 1.0)  # guidance only for t in [lo, hi]

    def __post_init__(self):
        self.cfg_interval = tuple(self.cfg_interval)
        if self.steps < 1 or self.rescale_t <= 0:
            raise ValueError(f"need steps >= 1 and rescale_t > 0, got {self.steps}, {self.rescale_t}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must be 0 <= lo <= hi <= 1, got {list(self.cfg_interval)}")


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t `[B]` -> `[B, 1, ..., 1]` broadcasting against x `[B, ...]`."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def diffuse(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, sigma_min: float = 1e-5) -> torch.Tensor:
    """x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps; x0, eps `[B, ...]`, t `[B]`."""
    t = _expand(t, x0)
    return (1.0 - t) * x0 + (sigma_min + (1.0 - sigma_min) * t) * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor, sigma_min: float = 1e-5) -> torch.Tensor:
    """The target d x_t / dt = (1 - sigma_min) eps - x0."""
    return (1.0 - sigma_min) * eps - x0


def sample_t(n: int, cfg: FlowConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """`[n]` training times in (0, 1) drawn by `cfg.t_schedule`."""
    device = generator.device if generator is not None else device
    if cfg.t_schedule == "uniform":
        return torch.rand(n, generator=generator, device=device)
    return torch.sigmoid(torch.randn(n, generator=generator, device=device) * cfg.t_std + cfg.t_mean)


def drop_condition(cond: torch.Tensor, p: float, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond `[B, T, D]` with each item replaced by the null condition (zeros) with probability p, dropped `[B]`)."""
    u = torch.rand(len(cond), generator=generator, device=generator.device if generator else cond.device)
    dropped = (u < p).to(cond.device)
    return cond * (~dropped).to(cond.dtype).reshape(-1, *([1] * (cond.dim() - 1))), dropped


def timesteps(cfg: SamplerConfig) -> list[float]:
    """The `steps + 1` times from 1 to 0: t = s u / (1 + (s - 1) u), u = linspace(1, 0), s = rescale_t."""
    u = torch.linspace(1.0, 0.0, cfg.steps + 1, dtype=torch.float64)
    s = cfg.rescale_t
    return (s * u / (1.0 + (s - 1.0) * u)).tolist()


def guided_velocity(predict: Predict, x: torch.Tensor, t: float, cond: torch.Tensor, cfg: SamplerConfig,
                    null_cond: torch.Tensor | None = None) -> torch.Tensor:
    """The sampler's velocity at x `[B, ...]`, time t: guided (weight cfg.cfg) inside cfg.cfg_interval, else
    conditional. null_cond defaults to zeros like cond."""
    tt = torch.full((len(cond),), t, device=x.device, dtype=torch.float32)
    v_cond = predict(x, tt, cond)
    lo, hi = cfg.cfg_interval
    if cfg.cfg == 1.0 or not lo <= t <= hi:
        return v_cond
    v_uncond = predict(x, tt, torch.zeros_like(cond) if null_cond is None else null_cond)
    return v_uncond + cfg.cfg * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(predict: Predict, noise: torch.Tensor, cond: torch.Tensor, cfg: SamplerConfig | None = None, *,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Integrate from `noise` `[B, ...]` (t = 1) to a sample (t = 0) with Euler steps x <- x - (t - t') v.

    Deterministic given `noise`; `progress(1)` is called after every step (e.g. a tqdm bar's update)."""
    cfg = cfg or SamplerConfig()
    grid = timesteps(cfg)
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x - (t - t_next) * guided_velocity(predict, x, t, cond, cfg).to(x.dtype)
        if progress is not None:
            progress(1)
    return x


def flow_loss(predict: Predict, x0: torch.Tensor, cond: torch.Tensor, cfg: FlowConfig,
              generator: torch.Generator | None = None, item: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict]:
    """One training step's MSE between predict(x_t, t, cond') and the velocity target (cond' = cond with items
    dropped for CFG). x0 `[B, ...]` holds one item per row, or, with `item` `[N]` (the item of each row, e.g. the
    batch column of sparse coords), rows `[N, C]` of B = len(cond) items; t is drawn per item. Returns (loss,
    logs: the mean t and the dropped fraction)."""
    device = x0.device
    t = sample_t(len(cond), cfg, generator, device).to(device)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device if generator else device)
    eps = eps.to(device, x0.dtype)
    kept, dropped = drop_condition(cond, cfg.p_uncond, generator)
    t_rows = t if item is None else t[item.long()]
    pred = predict(diffuse(x0, t_rows, eps, cfg.sigma_min), t, kept)
    loss = torch.mean((pred.float() - velocity(x0, eps, cfg.sigma_min).float()) ** 2)
    return loss, {"flow/t_mean": t.mean().detach(), "flow/uncond": dropped.float().mean().detach()}
