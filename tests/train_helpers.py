"""A tiny real training problem for the trainer tests: an MLP regressing a fixed smooth function, an MSE
objective that also draws from the trainer's generator, and a data source with DistributedSampler semantics that
draws augmentation noise from NumPy (so every RNG the checkpoint restores is exercised)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from focusing.train.config import TrainConfig, apply_overrides, from_dict, load_yaml

TARGET = torch.tensor([[0.35], [-0.65], [0.2], [1.0]])


@dataclass
class TinyConfig:
    width: int = 16
    dropout: float = 0.0


class TinyRegressor(torch.nn.Module):
    """x [B, 4] -> [B, 1]; `unused` is a head no step touches (its grad stays None)."""

    def __init__(self, config: TinyConfig | None = None):
        super().__init__()
        self.config = config or TinyConfig()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, self.config.width), torch.nn.Tanh(),
                                       torch.nn.Dropout(self.config.dropout), torch.nn.Linear(self.config.width, 1))
        self.unused = torch.nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.net(x)


class MSEObjective:
    """MSE with a little noise from the trainer's generator; optional faults: NaN loss at `nan_steps` (or at
    every step from `nan_from`), an infinite gradient at `inf_grad_steps`, a sleep per step."""

    def __init__(self, noise=0.01, nan_steps=(), nan_from=None, inf_grad_steps=(), sleep=0.0):
        self.noise, self.nan_steps, self.nan_from = noise, set(nan_steps), nan_from
        self.inf_grad_steps, self.sleep = set(inf_grad_steps), sleep

    def __call__(self, model, batch, *, step, generator, want_images):
        x, y = batch
        if self.sleep:
            time.sleep(self.sleep)
        pred = model(x)
        if self.noise:
            pred = pred + self.noise * torch.randn(pred.shape, generator=generator, device=pred.device)
        loss = torch.nn.functional.mse_loss(pred, y)
        if step in self.inf_grad_steps:  # finite loss, non-finite gradient (d sqrt(u) / du at u = 0)
            w = model.net[0].weight
            loss = loss + torch.sqrt((w - w.detach()).abs().sum())
        if step in self.nan_steps or (self.nan_from is not None and step >= self.nan_from):
            loss = loss * float("nan")
        images = None
        if want_images:
            images = {"target": torch.rand(8, 8, 3, generator=generator), "pred": torch.zeros(8, 8, 3)}
        return SimpleNamespace(loss=loss, logs={"mse": loss.detach(), "batch": float(len(x))}, images=images)


class RegressionSource:
    """`size` samples of a fixed dataset; each epoch is a seeded permutation, of which rank r takes every
    world_size-th index (DistributedSampler); x gets NumPy noise (augmentation) and is scaled by resolution/16."""

    def __init__(self, resolution, rank, world_size, *, batch_size, size=64, seed=0, augment=0.01):
        gen = torch.Generator().manual_seed(1234)
        self.x = torch.randn(size, 4, generator=gen)
        self.y = torch.sin(self.x @ TARGET)
        self.scale = resolution / 16
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.augment = seed, augment
        self.epoch, self.pos = 0, 0
        self.closed = False

    def _order(self):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return perm[self.rank:: self.world_size]

    def next_batch(self):
        order = self._order()
        if self.pos + self.batch_size > len(order):
            self.epoch, self.pos = self.epoch + 1, 0
            order = self._order()
        idx = order[self.pos: self.pos + self.batch_size]
        self.pos += self.batch_size
        x = self.x[idx] * self.scale
        if self.augment:
            x = x + torch.from_numpy(np.random.normal(0.0, self.augment, x.shape).astype(np.float32))
        return x, self.y[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]

    def close(self):
        self.closed = True


def source_factory(batch_size, **kw):
    return lambda resolution, rank, world_size, start_step: RegressionSource(resolution, rank, world_size,
                                                                             batch_size=batch_size, **kw)


def train_config(**overrides) -> TrainConfig:
    base = dict(steps=20, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, log_every=1, image_every=0,
                checkpoint_every=0, resolution=16, grad_clip=1.0)
    base.update(overrides)
    return from_dict(TrainConfig, base, where="test")


@dataclass
class FakeExperiment:
    """What `focusing.train.experiment.load_experiment` returns, as far as the command uses it."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: TinyConfig = field(default_factory=TinyConfig)


class FakeBuilders:
    """The builders the command takes from `focusing.train.experiment`, over the tiny regression problem."""

    def __init__(self):
        self.sources = []

    @staticmethod
    def load_experiment(path, overrides):
        return from_dict(FakeExperiment, apply_overrides(load_yaml(path), overrides), where=str(path))

    @staticmethod
    def build_model(cfg):
        return TinyRegressor(cfg.model)

    @staticmethod
    def build_objective(cfg):
        return MSEObjective()

    def build_source(self, cfg, resolution, rank, world_size, device, start_step):
        source = RegressionSource(resolution, rank, world_size, batch_size=cfg.train.batch_size)
        self.sources.append(source)
        return source


def distributed_worker(rank, world_size, port, folder):
    """One rank of the two-process gloo test: gradients of the local half batch averaged by `average_gradients`
    (saved to folder/grads-RANK.safetensors), then a short `Trainer` run into folder/run."""
    import os

    from safetensors.torch import save_file

    from focusing.train.distributed import (
        average_gradients, broadcast_module, setup_distributed, teardown_distributed,
    )
    from focusing.train.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = setup_distributed("cpu")
    try:
        torch.manual_seed(rank)  # other weights on rank 1: the broadcast must replace them
        model = TinyRegressor()
        broadcast_module(model, ctx)
        x, y = distributed_batch()
        torch.nn.functional.mse_loss(model(x[rank::world_size]), y[rank::world_size]).backward()
        if rank == 0:  # `unused.weight` gets a gradient on rank 0 only, `unused.bias` on no rank
            model.unused.weight.sum().backward()
        average_gradients([p for p in model.parameters()], ctx)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        save_file(grads, os.path.join(folder, f"grads-{rank}.safetensors"))

        torch.manual_seed(rank)
        trainer = Trainer(TinyRegressor(), MSEObjective(noise=0.0), source_factory(4, augment=0.0),
                          distributed_config(), os.path.join(folder, "run"), experiment_config={}, dist=ctx,
                          progress=False)
        trainer.run()
    finally:
        teardown_distributed()


def distributed_batch():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 4, generator=gen)
    return x, torch.sin(x @ TARGET)


def distributed_config() -> TrainConfig:
    # eps >> |g| makes Adam's update about lr * g / eps: a gradient summed instead of averaged would show
    return train_config(steps=3, lr=0.5, eps=10.0, grad_clip=0.0, warmup_steps=0, min_lr=0.0)
