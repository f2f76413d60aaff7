"""`focusing train --config C.yaml [--out DIR] [--resume] [--max-minutes M] [--set key=value ...] [--init-from W]`:
train a model described by an experiment config, on a CPU, one GPU or (under torchrun) many."""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from types import ModuleType

from focusing.commands.checks import device, positive_float

LAYOUT = """\
files in OUT (default runs/<config name>):
  checkpoint/       the latest checkpoint only (checkpoint.json + tensors-*.safetensors, at most 16 MiB each by
                    default), replaced atomically every train.checkpoint_every steps and at the end
  metrics.jsonl     one JSON record every train.log_every steps: every loss term the objective logs, loss,
                    grad_norm, lr, step_time, data_wait (s a step waited for its batch), steps_per_s, samples_per_s,
                    resolution, peak_memory_gib (CUDA)
  images/           step-NNNNNNN.png grids of the objective's images every train.image_every steps
  tensorboard/      the same scalars and images for TensorBoard, when the optional extra is installed
                    (pip install 'focusing[tensorboard]'; then: tensorboard --logdir OUT)

several GPUs: torchrun --nproc_per_node N -m focusing train --config C.yaml ... (train.batch_size is per GPU)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from an experiment config (CPU, one GPU, or many under torchrun)",
        description="Trains the model of an experiment config with AdamW, warm-up + cosine schedule, autocast, "
        "gradient clipping, EMA and progressive resolution stages. --resume continues the checkpoint in OUT "
        "exactly; --max-minutes stops cleanly with a checkpoint before the limit. An existing checkpoint is "
        "never overwritten by a new run.",
        epilog=LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="experiment config (YAML)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<config file name without .yaml>)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in OUT")
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="wall-clock budget of this command: stop and checkpoint before it runs out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable; values are YAML)")
    p.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="start a new run from these weights (an exported folder or a run's checkpoint; weights "
                   "only, no optimizer state), e.g. the next resolution stage of an earlier run")
    p.add_argument("--device", type=device, default=None, help="torch device (default: cuda when available, else cpu; "
                   "under torchrun each process takes cuda:LOCAL_RANK)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def check_run_folder(out: Path, resume: bool, init_from: str | None) -> int | None:
    """Refuse what would lose or mix up work: --resume without a checkpoint, a new run in a folder that holds a
    checkpoint or other files, --resume together with --init-from. Returns the step to resume from (or None)."""
    from focusing.errors import FocusingError, InputError
    from focusing.train.checkpoint import checkpoint_step
    from focusing.train.trainer import CHECKPOINT_DIR

    if out.exists() and not out.is_dir():
        raise InputError(out, "the run folder (--out) exists and is not a folder")
    if resume and init_from:
        raise FocusingError("--resume continues the checkpoint in the run folder, --init-from starts a new run "
                            "from weights: give one of them")
    step = checkpoint_step(out / CHECKPOINT_DIR) if out.is_dir() else None
    if resume:
        if step is None:
            raise InputError(out, f"--resume given, but there is no checkpoint to resume ({CHECKPOINT_DIR}/ "
                                  f"holds no checkpoint.json)")
        return step
    if step is not None:
        raise InputError(out, f"already holds a checkpoint at step {step}: pass --resume to continue it, or "
                              f"choose another --out (nothing is overwritten)")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(out, "the run folder is not empty (files of an earlier run without a checkpoint?): "
                              "choose another --out or empty it")
    return None


def make_trainer(experiment, builders: ModuleType | object, ctx, out: Path, *, init_from: str | None = None,
                 progress: bool = True):
    """The `Trainer` that `focusing train` runs in this process (`ctx`: `setup_distributed`'s result): the
    model seeded by train.seed (the same initial weights on every rank and every run) or loaded from `init_from`,
    the objective and this rank's data source from `builders` (see `run`)."""
    import torch

    from focusing.train.checkpoint import load_state_dict_strict, load_weights
    from focusing.train.config import to_dict
    from focusing.train.trainer import Trainer

    torch.manual_seed(experiment.train.seed)
    model = builders.build_model(experiment)
    if init_from:
        state, _ = load_weights(init_from)
        load_state_dict_strict(model, state, init_from)

    def source_factory(resolution: int, rank: int, world_size: int, start_step: int):
        return builders.build_source(experiment, resolution, rank, world_size, ctx.device, start_step)

    return Trainer(model, builders.build_objective(experiment), source_factory, experiment.train, out,
                   experiment_config=to_dict(experiment), dist=ctx, progress=progress)


def run(args: argparse.Namespace, builders: ModuleType | object | None = None) -> int:
    """Run `focusing train`. `builders` provides load_experiment(path, overrides), build_model(cfg),
    build_objective(cfg) and build_source(cfg, resolution, rank, world_size, device, start_step); by default
    `focusing.train.experiment`."""
    started = time.monotonic()
    from focusing.train.distributed import setup_distributed, teardown_distributed

    if builders is None:
        builders = importlib.import_module("focusing.train.experiment")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    resume_step = check_run_folder(out, args.resume, args.init_from)
    experiment = builders.load_experiment(args.config, list(args.set))
    ctx = setup_distributed(args.device)
    try:
        trainer = make_trainer(experiment, builders, ctx, out, init_from=args.init_from, progress=not args.quiet)
        if ctx.is_main and resume_step is not None:
            print(f"resuming {out} at step {resume_step}")
        result = trainer.run(args.max_minutes, args.resume, started=started)
    finally:
        teardown_distributed()
    if ctx.is_main:
        why = {"done": "all steps done", "time": "--max-minutes budget reached", "steps": "step budget reached"}
        print(f"stopped at step {result.step} of {experiment.train.steps} ({why[result.reason]}); "
              f"checkpoint: {result.checkpoint}")
    return 0
