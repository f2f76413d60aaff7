"""An experiment = one YAML file with five sections, each a typed dataclass (unknown keys are errors):

    model: VAEConfig        (focusing.models.vae)       architecture
    loss:  LossConfig       (focusing.losses)           weights of Eq. 7, TSDF warm-up length
    views: ViewConfig       (focusing.train.objective)  cameras, carving, adaptive zoom
    data:  DataConfig       (focusing.train.config)     training meshes, points, augmentation
    train: TrainConfig      (focusing.train.config)     optimiser, schedule, stages, logging, checkpoints

`focusing train --config configs/S.yaml` builds everything from here (`build_model`, `build_objective`,
`build_source`); the named configs live in the repository's `configs/` folder. A top-level `kind:` other than
`vae` selects one of the image-to-3D generator's experiments (`focusing.train.generation.EXPERIMENTS`), which
build their own model, objective and source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from focusing.errors import InputError
from focusing.losses import LossConfig
from focusing.models.vae import FocusingVAE, VAEConfig
from focusing.train.config import DataConfig, TrainConfig, apply_overrides, from_dict
from focusing.train.objective import ViewConfig, VAEObjective


@dataclass
class ExperimentConfig:
    kind: Literal["vae"] = "vae"
    model: VAEConfig = field(default_factory=VAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_experiment(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The experiment of a YAML file, with `a.b=value` overrides applied (one-line errors name file and key)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(path, "a config is a mapping of sections (model, loss, views, data, train)")
    data = apply_overrides(data, list(overrides), where=str(path))
    kind = data.get("kind", "vae")
    if kind != "vae":
        from focusing.train.generation import EXPERIMENTS

        if kind not in EXPERIMENTS:
            raise InputError(f"{path}:kind", f"expected one of vae, {', '.join(EXPERIMENTS)}, got {kind!r}")
        return from_dict(EXPERIMENTS[kind], data, where=str(path))
    return from_dict(ExperimentConfig, data, where=str(path))


def build_model(cfg: ExperimentConfig):
    if not isinstance(cfg, ExperimentConfig):  # a generator experiment
        return cfg.build_model()
    return FocusingVAE(cfg.model)


def build_objective(cfg: ExperimentConfig):
    if not isinstance(cfg, ExperimentConfig):
        return cfg.build_objective()
    return VAEObjective(cfg.loss, cfg.views)


def build_source(cfg: ExperimentConfig, resolution: int, rank: int, world_size: int, device: torch.device,
                 start_step: int = 0):
    """The training batches at `resolution` for this rank (`focusing.data.online.make_source`) of the stage
    starting at `start_step`; a stage that starts inside the TSDF warm-up builds the corner TSDF with each
    sample (make the warm-up its own stage, as configs/S.yaml does, so the rest of training skips that cost)."""
    if not isinstance(cfg, ExperimentConfig):
        return cfg.build_source(resolution, rank, world_size, device, start_step)
    from focusing.data.online import make_source

    d = cfg.data
    warm_up = bool(cfg.loss.tsdf) and start_step < cfg.loss.tsdf_steps
    return make_source(
        d.source, resolution=resolution, points=d.points, batch_size=cfg.train.batch_size, rank=rank,
        world_size=world_size, seed=cfg.train.seed, device=device, augment=d.augment, reuse=d.reuse,
        exclude=d.exclude,
        tsdf_truncation=cfg.loss.tsdf_truncation_voxels if warm_up else None,
    )
