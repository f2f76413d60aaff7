"""The training loop: AdamW with linear warm-up + cosine decay, autocast, gradient clipping, EMA, skipped
non-finite steps, progressive resolution stages, data parallelism over torchrun ranks, exact resume and a wall
clock budget.

One step: set the learning rate, take `source.next_batch()`, call `objective(model, batch, step=, generator=,
want_images=)` under autocast, back-propagate, average the gradients over ranks, clip, step AdamW, update the EMA.
A non-finite loss or gradient norm (on any rank) skips the update on every rank and is counted; `max_nonfinite`
in a row stop the run. The step counter counts skipped steps too, so the schedule and the stages depend on the
step alone, and a resumed run repeats an unbroken one exactly (same world size).

Rank 0 alone logs and checkpoints; every rank's RNG and data-source states are gathered into the checkpoint.
Files in `out_dir`: `checkpoint/` (the latest only), `metrics.jsonl`, `images/`, `tensorboard/` (optional).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from focusing.device import use_torch_compile
from focusing.errors import FocusingError
from focusing.train.checkpoint import (
    CHECKPOINT_JSON, first_difference, load_checkpoint, load_state_dict_strict, pack_state, save_checkpoint,
    unpack_state,
)
from focusing.train.config import TrainConfig, to_dict, with_defaults
from focusing.train.distributed import Distributed, any_rank, average_gradients, broadcast_module, gather_json
from focusing.train.logs import MetricsLog
from focusing.train.rng import rank_seed, rng_state, seed_everything, set_rng_state

CHECKPOINT_DIR = "checkpoint"
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
_SAVE_BYTES_PER_S = 200e6  # first guess of the checkpoint write speed, before one was timed


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate of 0-based step `step`: linear warm-up to `lr` over `warmup_steps`, then a cosine decay that
    reaches `min_lr` at step `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


@dataclass
class RunResult:
    """How `Trainer.run` ended: at `step`, because of `reason` ("done": all steps; "time": the --max-minutes
    budget; "steps": the `max_steps` budget of this call), with the checkpoint folder it wrote."""

    step: int
    reason: str
    checkpoint: Path | None


class Trainer:
    """Trains `model` on `objective` with batches from `source_factory(resolution, rank, world_size, start_step)`
    (called when a stage starts, with the stage's first step; the source has next_batch / state_dict /
    load_state_dict / close)."""

    def __init__(self, model: torch.nn.Module, objective: Callable, source_factory: Callable, cfg: TrainConfig,
                 out_dir, *, experiment_config: dict, dist: Distributed | None = None, progress: bool = True):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / CHECKPOINT_DIR
        self.dist = dist or Distributed()
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.objective = objective.to(self.device) if isinstance(objective, torch.nn.Module) else objective
        self.source_factory = source_factory
        self.experiment_config = experiment_config
        self.progress = progress
        broadcast_module(self.model, self.dist)
        self.named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        if not self.params:
            raise FocusingError("the model has no trainable parameters")
        cuda = self.device.type == "cuda"
        if cfg.compile:  # the same math in fewer kernels; the first step compiles
            use_torch_compile(min_rows=cfg.compile_min_rows)
        self.amp_dtype = _AMP[cfg.amp] if cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                           weight_decay=cfg.weight_decay, fused=cuda or None)
        self.ema = {n: p.detach().float().clone() for n, p in self.named_params} if cfg.ema_decay > 0 else None
        self.generator = torch.Generator(device=self.device)
        self.step = 0
        self.stage = -1
        self.source = None
        self._source_state: tuple[int, dict] | None = None  # (stage, state) to load into the next source
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.train_seconds = 0.0  # wall time of earlier runs of this training (resumed from the checkpoint)
        self._sums: dict[str, Any] = {}
        self._count = 0
        self._interval = {"steps": 0, "seconds": 0.0, "data_seconds": 0.0, "started": time.perf_counter()}
        self._save_seconds: float | None = None
        self._longest_step = 0.0
        self._warm = False

    # ---- the loop ---------------------------------------------------------------------------------------------

    def run(self, max_minutes: float | None = None, resume: bool = False, *, max_steps: int | None = None,
            started: float | None = None) -> RunResult:
        """Train until `cfg.steps`, or until `max_minutes` of wall time since `started` (time.monotonic(); now
        by default) would be exceeded by one more step and a checkpoint, or until `max_steps` steps of this call;
        then checkpoint. `resume` continues the checkpoint in `out_dir` exactly."""
        started = time.monotonic() if started is None else started
        if resume:
            self._restore()
        else:
            seed_everything(rank_seed(self.cfg.seed, self.dist.rank), self.generator)
        self._run_started = time.monotonic()
        log = MetricsLog(self.out_dir, resume_step=self.step if resume else None) if self.dist.is_main else None
        first, reason, saved_at = self.step, "done", None
        self._interval["started"] = time.perf_counter()
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not (self.progress and self.dist.is_main),
                   dynamic_ncols=True, file=sys.stderr, desc="train")
        self.model.train()
        try:
            while self.step < self.cfg.steps:
                if max_steps is not None and self.step - first >= max_steps:
                    reason = "steps"
                    break
                if max_minutes is not None and any_rank(self._out_of_time(started, max_minutes), self.dist):
                    reason = "time"
                    break
                t0 = time.perf_counter()
                new_stage = self._enter_stage()  # building a stage's source counts as part of its first step
                want_images = (self.dist.is_main and self.cfg.image_every > 0
                               and (self.step + 1) % self.cfg.image_every == 0)
                result = self._train_step(want_images)
                seconds = time.perf_counter() - t0
                self._time_step(seconds, new_stage)
                self.step += 1
                self._interval["steps"] += 1
                self._interval["seconds"] += seconds
                bar.update(1)
                if log is not None and self.step % self.cfg.log_every == 0:
                    record = self._record()
                    log.write(self.step, record)
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}", refresh=False)
                if log is not None and want_images and result is not None and result.images:
                    log.image(self.step, result.images)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save()
                    saved_at = self.step
            if saved_at != self.step:
                self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
            if self.source is not None:
                self.source.close()
                self.source = None
        return RunResult(self.step, reason, self.ckpt_dir if self.dist.is_main else None)

    def _out_of_time(self, started: float, max_minutes: float) -> bool:
        """True when one more step (the longest seen) plus a checkpoint write might overrun the budget."""
        if self._save_seconds is None:
            self._save_seconds = 1.0 + self._state_bytes() / _SAVE_BYTES_PER_S
        left = max_minutes * 60.0 - (time.monotonic() - started)
        return left < 1.5 * (self._longest_step + self._save_seconds) + 1.0

    def _time_step(self, seconds: float, new_stage: bool) -> None:
        """Track the longest step for the time budget; a stage's first step (compilation, caches) counts only
        until a warm step was seen."""
        if not new_stage:
            self._longest_step = max(self._longest_step, seconds) if self._warm else seconds
            self._warm = True
        elif not self._warm:
            self._longest_step = max(self._longest_step, seconds)

    def _state_bytes(self) -> int:
        per_param = sum(p.numel() * 4 for p in self.params)
        return per_param * (3 + (self.ema is not None))

    def _enter_stage(self) -> bool:
        """Build the data source of the stage of the current step if it is not built yet; True when it was."""
        stage = self.cfg.stage_at(self.step)
        if stage == self.stage and self.source is not None:
            return False
        if self.source is not None:
            self.source.close()
        start, resolution = self.cfg.stage_plan()[stage]
        self.source = self.source_factory(resolution, self.dist.rank, self.dist.world_size, start)
        if self._source_state is not None and self._source_state[0] == stage:
            self.source.load_state_dict(self._source_state[1])
        self._source_state = None
        self.stage = stage
        return True

    def _train_step(self, want_images: bool):
        """One optimiser step (or a skipped one); returns the objective's result."""
        lr = learning_rate(self.cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        waited = time.perf_counter()
        batch = self.source.next_batch()
        self._interval["data_seconds"] += time.perf_counter() - waited
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            result = self.objective(self.model, batch, step=self.step, generator=self.generator,
                                    want_images=want_images)
        loss = result.loss.float()
        if any_rank(not bool(torch.isfinite(loss.detach())), self.dist):
            self._skip("loss")
            return result
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        average_gradients(self.params, self.dist)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or math.inf)
        if not math.isfinite(norm.item()):  # equal on every rank: the gradients were averaged
            if self.scaler is not None:
                self.scaler.update()
            self._skip("gradient")
            return result
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            decay = self.cfg.ema_decay if self.step >= self.cfg.ema_start else 0.0
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.values()), [p.detach().float() for p in self.params],
                                     1.0 - decay)
        self.nonfinite_in_row = 0
        if self.dist.is_main:
            self._accumulate({"loss": loss.detach(), "grad_norm": norm.detach(), **result.logs})
        return result

    def _skip(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        if self.nonfinite_in_row >= self.cfg.max_nonfinite:
            raise FocusingError(
                f"{self.nonfinite_in_row} non-finite losses or gradients in a row (the last a non-finite {what} "
                f"at step {self.step}); stopped without saving, the last checkpoint is kept: lower train.lr, raise "
                f"train.warmup_steps, or check the data")

    def _accumulate(self, scalars: dict) -> None:
        for name, value in scalars.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._count += 1

    def _record(self) -> dict[str, float]:
        """Scalars of the interval since the last record: the objective's logs, loss and grad_norm (means over the
        updated steps), lr, timing and memory."""
        record = {name: float(total) / max(self._count, 1) for name, total in self._sums.items()}
        interval, now = self._interval, time.perf_counter()
        wall = max(now - interval["started"], 1e-9)
        record.update({
            "lr": learning_rate(self.cfg, self.step - 1),
            "step_time": interval["seconds"] / max(interval["steps"], 1),
            "data_wait": interval["data_seconds"] / max(interval["steps"], 1),
            "steps_per_s": interval["steps"] / wall,
            "samples_per_s": interval["steps"] * self.cfg.batch_size * self.dist.world_size / wall,
            "resolution": float(self.cfg.stage_plan()[self.stage][1]),
            "nonfinite_total": float(self.nonfinite_total),
        })
        if self.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._sums, self._count = {}, 0
        self._interval = {"steps": 0, "seconds": 0.0, "data_seconds": 0.0, "started": now}
        return record

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoint the whole training state (rank 0 writes; every rank contributes its RNG and source)."""
        t0 = time.perf_counter()
        ranks = gather_json({"rng": rng_state(self.generator),
                             "source": self.source.state_dict() if self.source is not None else None}, self.dist)
        if not self.dist.is_main:
            return
        tensors: dict[str, torch.Tensor] = {}
        for name, value in self.model.state_dict().items():
            tensors[f"model/{name}"] = (value.float() if value.is_floating_point() else value).detach().cpu().clone()
        if self.ema is not None:
            pack_state(self.ema, "ema", tensors)
        seconds = self.train_seconds + time.monotonic() - self._run_started
        config = getattr(self.model, "config", None)
        meta = {
            "step": self.step,
            "stage": self.stage,
            "world_size": self.dist.world_size,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "model_config": to_dict(config) if config is not None else None,
            "train": to_dict(self.cfg),
            "experiment": self.experiment_config,
            "optimizer": pack_state(self.optimizer.state_dict(), "optimizer", tensors),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "schedule": {"kind": "warmup_cosine", "lr": learning_rate(self.cfg, max(self.step - 1, 0))},
            "nonfinite": {"in_row": self.nonfinite_in_row, "total": self.nonfinite_total},
            "train_seconds": seconds,
            "gpu_seconds": seconds * self.dist.world_size if self.device.type == "cuda" else 0.0,
            "log_interval": {"sums": {k: float(v) for k, v in self._sums.items()}, "count": self._count},
            "ranks": ranks,
        }
        save_checkpoint(self.ckpt_dir, tensors, meta, shard_bytes=int(self.cfg.checkpoint_shard_mb * 2**20))
        self._save_seconds = time.perf_counter() - t0

    def _note_train_changes(self, saved: dict | None, where) -> None:
        """A note on stderr when the train config now differs from the checkpoint's in what shapes the run (steps,
        schedule, batch, stages, ...; not the logging and checkpoint intervals): a resume without the first run's
        `--set` overrides otherwise continues under the YAML's values, e.g. stops at once when its `steps` are fewer.
        Changing them on purpose is allowed (training longer); the run is then not an exact continuation."""
        if saved is None or not self.dist.is_main:
            return
        ignored = ("log_every", "image_every", "checkpoint_every", "checkpoint_shard_mb", "max_nonfinite")
        now = {k: v for k, v in to_dict(self.cfg).items() if k not in ignored}
        saved = with_defaults(saved, self.cfg)
        difference = first_difference({k: v for k, v in saved.items() if k not in ignored}, now)
        if difference is not None:
            key, was, new = difference
            print(f"focusing train: {where}: the train config differs from the checkpoint's at {key!r} "
                  f"(checkpoint {was!r}, now {new!r}); the run goes on with the new value (repeat the first run's "
                  f"--set to continue it exactly)", file=sys.stderr)

    def _restore(self) -> None:
        tensors, meta = load_checkpoint(self.ckpt_dir)
        where = self.ckpt_dir / CHECKPOINT_JSON
        config = getattr(self.model, "config", None)
        if config is not None and meta.get("model_config") is not None:
            difference = first_difference(with_defaults(meta["model_config"], config), to_dict(config))
            if difference is not None:
                raise FocusingError(f"{where}: cannot resume, the model config differs at {difference[0]!r} "
                                    f"(checkpoint {difference[1]!r}, now {difference[2]!r})")
        self._note_train_changes(meta.get("train"), where)
        load_state_dict_strict(self.model, {k[len("model/"):]: v for k, v in tensors.items()
                                            if k.startswith("model/")}, where)
        try:
            self.optimizer.load_state_dict(unpack_state(meta["optimizer"], tensors))
        except (ValueError, KeyError) as exc:
            raise FocusingError(f"{where}: the optimizer state does not fit the model ({exc})") from None
        if self.ema is not None:
            saved = {k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")}
            for name in self.ema:  # no EMA in the checkpoint (it was off): start from the weights
                self.ema[name] = saved[name].to(self.device) if name in saved else \
                    dict(self.named_params)[name].detach().float().clone()
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        self.nonfinite_in_row = int(meta["nonfinite"]["in_row"])
        self.nonfinite_total = int(meta["nonfinite"]["total"])
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        if self.dist.is_main:
            self._sums = dict(meta["log_interval"]["sums"])
            self._count = int(meta["log_interval"]["count"])
        ranks = meta["ranks"]
        if len(ranks) == self.dist.world_size:
            mine = ranks[self.dist.rank]
            saved_on = torch.device(mine["rng"]["generator"]["device"]).type
            if saved_on == self.generator.device.type:
                set_rng_state(mine["rng"], self.generator)
            else:  # a CUDA generator's state does not fit a CPU one (and back)
                if self.dist.is_main:
                    print(f"focusing train: the checkpoint's random streams were saved on {saved_on}, this run is on "
                          f"{self.generator.device.type}: weights, optimizer and the data stream resume, the random "
                          f"streams restart (not an exact continuation)", file=sys.stderr)
                seed_everything(rank_seed(self.cfg.seed + self.step, self.dist.rank), self.generator)
            if mine["source"] is not None:
                self._source_state = (int(meta["stage"]), mine["source"])
        else:
            if self.dist.is_main:
                print(f"focusing train: the checkpoint was written by {len(ranks)} processes, this run has "
                      f"{self.dist.world_size}: weights and optimizer resume, random and data streams restart "
                      f"(not an exact continuation)", file=sys.stderr)
            seed_everything(rank_seed(self.cfg.seed + self.step, self.dist.rank), self.generator)
