"""Data-parallel training throughput and loss-curve equivalence of `focusing train` under torchrun (issue 13).

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    RUN="python -m torch.distributed.run --standalone"
    $RUN --nproc_per_node=1 benchmarks/bench_ddp.py --config S --resolution 512 --batch 4 --json n1.json \\
        --set data.source=corpus.safetensors
    $RUN --nproc_per_node=2 benchmarks/bench_ddp.py --config S --resolution 512 --batch 2 --json n2.json \\
        --set data.source=corpus.safetensors --reference n1.json
    python benchmarks/bench_ddp.py --compare n1.json n2.json     # same global batch: loss curves within noise?
    python benchmarks/bench_ddp.py --merge n1.json n2.json       # markdown table

A run is `focusing train`'s own trainer (`focusing.commands.train.make_trainer`: the same model, objective, data
source, DDP gradient averaging, AdamW, EMA) on the config with these overrides, then `--set` (which wins):
train.stages=[] and train.resolution=R (one stage at `--resolution`), train.batch_size=`--batch` (per process),
train.steps=`--steps`, no checkpoints or images during the run, loss.tsdf_steps=0 (after the TSDF warm-up, as
S's 512 stage trains: no corner TSDF in the data path). The trainer's objective is wrapped to record, per step
and rank, the wall time at entry, the loss and the batch's mesh ids; the checkpoint the trainer writes when it
stops goes to a temporary folder. Works with the same code on CUDA (NCCL, one process per GPU) and on the CPU
(gloo), and without torchrun as one process. NVLink multicast stays off: the script sets NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 in its own environment before NCCL starts (it
spawns nothing; torchrun starts it, so export them for torchrun too, as above).

Per run (rank 0 writes the JSON atomically): config, R, world size, batch per rank, global batch; step time =
median of the `--steps` - `--warmup` - 1 intervals between consecutive steps' starts on rank 0 after `--warmup`
steps (a whole step: data wait, forward, backward, all-reduce, optimiser, EMA); steps/s = 1 / that, samples/s =
global batch / that; peak memory per rank (`torch.cuda.max_memory_allocated` over the run; None on the CPU);
per step the loss averaged over ranks (each rank's loss is the mean over its items) and the global batch's mesh
ids; whether every rank ends with bit-identical parameters (sha256); scaling efficiency against an N = 1 run
(`--reference`, or in `--merge`): (samples/s per process) / (samples/s of the reference per process).
`--max-minutes` stops the run cleanly (the trainer's own budget) with the steps done so far.

`--compare A.json B.json` (e.g. N = 1 with batch b against N = 2 with b / 2 per rank): both runs must have the
same experiment settings but the per-rank batch (config, R, seed, schedule...), the same initial weights and
global batch, and the same meshes in the same order at every step (checked on the ids; the data stream is a
function of (seed, global sample index), whatever the world size). What still differs is each rank's own random
stream (rank-seeded: cameras, posterior noise, zoom draws), the per-rank mean of the loss and float reduction
order, so the curves agree in distribution, not step by step. Test (paired: same meshes at the same step): the
gap d = loss_B - loss_A, cut into `--batches` batches of consecutive steps, has mean zero in every batch; the
noise is the scatter of d around its batch means (pooled), and each batch mean must lie within a 99% band
(Student t, Bonferroni over the batches). Step-to-step camera noise stays inside the band; a gap that persists
over a batch (another learning rate, diverging weights) leaves it. Exit code 1 when the curves do not follow
each other or are not comparable. It only sees gaps larger than the noise of the run's steps (the band is
printed); the exact check of DDP's gradient averaging is tests/test_train_distributed.py (a deterministic
objective: 2 processes == 1 to float precision), and every run checks that its ranks end bit-identical.
"""

from __future__ import annotations

import os

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)  # before NCCL reads its environment (setup_distributed)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's `focusing`

from focusing.io.atomic import write_text_atomic  # noqa: E402


# ---------------------------------------------------------------------------------------------- one run
class StepRecorder:
    """Wraps the trainer's objective: per call (one per step), the perf_counter time at entry, this rank's loss
    (None when not finite) and the batch's mesh ids."""

    def __init__(self, objective):
        self.objective = objective
        self.starts: list[float] = []
        self.losses: list[float | None] = []
        self.ids: list[list[str]] = []

    def __call__(self, model, batch, **kwargs):
        self.starts.append(time.perf_counter())
        result = self.objective(model, batch, **kwargs)
        loss = float(result.loss.detach())
        self.losses.append(loss if math.isfinite(loss) else None)
        self.ids.append(list(batch["ids"]))
        return result


def config_path(name: str) -> Path:
    """configs/<name>.yaml for a bare name (S, B, tiny), else the path as given."""
    return Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "configs" / f"{name}.yaml"


def bench_overrides(args) -> list[str]:
    """The run's `--set` list: one stage at R, the batch, the steps, no checkpoints / images, no TSDF warm-up;
    the user's `--set` last (it wins)."""
    own = ["train.stages=[]", f"train.resolution={args.resolution}", f"train.steps={args.steps}",
           "train.checkpoint_every=0", "train.image_every=0", f"train.log_every={args.steps}", "loss.tsdf_steps=0"]
    if args.batch is not None:
        own.append(f"train.batch_size={args.batch}")
    return own + list(args.set)


def params_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def step_timing(starts: list[float], warmup: int) -> dict:
    """Median / mean interval between consecutive step starts after `warmup` steps (None when < 1 interval)."""
    intervals = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1:])]
    if not intervals:
        return {"timed_steps": 0, "median_step_s": None, "mean_step_s": None}
    return {"timed_steps": len(intervals), "median_step_s": statistics.median(intervals),
            "mean_step_s": statistics.fmean(intervals)}


def summarise(ranks: list[dict], *, world_size: int, batch: int, warmup: int) -> dict:
    """Rank 0's record of the run from every rank's StepRecorder data (`ranks`, in rank order)."""
    n = min(len(r["losses"]) for r in ranks)
    losses = []
    for i in range(n):
        values = [r["losses"][i] for r in ranks]
        losses.append(None if None in values else statistics.fmean(values))
    timing = step_timing(ranks[0]["starts"], warmup)
    median = timing["median_step_s"]
    peaks = [r["peak_gib"] for r in ranks]
    return {
        "world_size": world_size, "batch_per_rank": batch, "global_batch": batch * world_size,
        "steps_run": n, "warmup": warmup, **timing,
        "steps_per_s": 1.0 / median if median else None,
        "samples_per_s": batch * world_size / median if median else None,
        "peak_memory_gib": None if None in peaks else peaks,
        "params_identical_on_ranks": len({r["params_sha256"] for r in ranks}) == 1,
        "loss": losses,
        "rank_losses": [r["losses"][:n] for r in ranks],
        "ids": [[i for r in ranks for i in r["ids"][step]] for step in range(n)],
    }


def efficiency(run: dict, reference: dict) -> float | None:
    """Samples/s per process of `run` over that of `reference` (an N = 1 run: the scaling efficiency)."""
    if not run.get("samples_per_s") or not reference.get("samples_per_s"):
        return None
    return (run["samples_per_s"] / run["world_size"]) / (reference["samples_per_s"] / reference["world_size"])


def run_benchmark(args) -> dict | None:
    """One timed training run in this process (one rank of it under torchrun); rank 0 returns the record."""
    started = time.monotonic()
    from focusing.commands.train import make_trainer
    from focusing.train import experiment as builders
    from focusing.train.config import to_dict
    from focusing.train.distributed import gather_json, setup_distributed, teardown_distributed

    overrides = bench_overrides(args)
    experiment = builders.load_experiment(config_path(args.config), overrides)
    ctx = setup_distributed(args.device)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_ddp-") as tmp:
            trainer = make_trainer(experiment, builders, ctx, Path(tmp) / "run", init_from=args.init_from,
                                   progress=False)
            recorder = StepRecorder(trainer.objective)
            trainer.objective = recorder
            cuda = ctx.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            result = trainer.run(args.max_minutes, started=started)
            mine = {"starts": recorder.starts, "losses": recorder.losses, "ids": recorder.ids,
                    "peak_gib": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None,
                    "params_sha256": params_sha256(trainer.model)}
            ranks = gather_json(mine, ctx)
    finally:
        teardown_distributed()
    if not ctx.is_main:
        return None
    train = experiment.train
    record = {
        "benchmark": "bench_ddp", "config": args.config, "resolution": train.resolution, "overrides": overrides,
        "init_from": args.init_from, "experiment": to_dict(experiment), "device": ctx.device.type,
        "machine": torch.cuda.get_device_name(ctx.device) if cuda else (platform.processor() or "cpu"),
        "backend": ("nccl" if cuda else "gloo") if ctx.world_size > 1 else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "stopped": result.reason, "wall_s": time.monotonic() - started,
        **summarise(ranks, world_size=ctx.world_size, batch=train.batch_size, warmup=args.warmup),
    }
    if args.reference:
        record["reference"] = str(args.reference)
        record["efficiency"] = efficiency(record, json.loads(Path(args.reference).read_text()))
    return record


# ---------------------------------------------------------------------------------------------- compare
def comparable(a: dict, b: dict) -> list[str]:
    """Why the loss curves of runs `a` and `b` cannot be compared step by step (empty: they can)."""
    problems = [f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in ("config", "init_from", "global_batch")
                if a.get(key) != b.get(key)]
    settings = [_without_batch(r["experiment"]) for r in (a, b)]
    if settings[0] != settings[1]:
        problems.append("different experiment settings (other than train.batch_size)")
    n = min(len(a["ids"]), len(b["ids"]))
    first = next((i for i in range(n) if a["ids"][i] != b["ids"][i]), None)
    if first is not None:
        problems.append(f"different meshes at step {first}: {a['ids'][first]} vs {b['ids'][first]}")
    return problems


def _without_batch(experiment: dict) -> dict:
    return {**experiment, "train": {k: v for k, v in experiment["train"].items() if k != "batch_size"}}


def compare_losses(a: list[float | None], b: list[float | None], batches: int = 5) -> dict:
    """The paired test of the module docstring on two per-step loss lists (None: a skipped step): the gap
    d = b - a in `batches` batches of consecutive steps (a remainder at the end is left out); each batch's mean
    gap must lie within t(1 - 0.01 / (2 batches), dof) x s / sqrt(steps per batch), s the pooled scatter of d
    around its batch means (dof = steps - batches)."""
    from scipy.stats import t as student_t

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    size = len(pairs) // batches
    if batches < 1 or size < 2:
        raise ValueError(f"{len(pairs)} comparable steps cannot make {batches} batches of >= 2 steps")
    pairs = pairs[: batches * size]
    d = [y - x for x, y in pairs]
    groups = [d[i * size: (i + 1) * size] for i in range(batches)]
    means = [statistics.fmean(g) for g in groups]
    dof = len(d) - batches
    scatter = math.sqrt(sum((x - m) ** 2 for g, m in zip(groups, means) for x in g) / dof)
    band = float(student_t.ppf(1 - 0.01 / (2 * batches), dof)) * scatter / math.sqrt(size)
    return {
        "steps": len(d), "batches": batches, "batch_gaps": means, "band_99": band, "step_noise": scatter,
        "mean_gap": statistics.fmean(d), "relative_gap": statistics.fmean(d) / statistics.fmean(x for x, _ in pairs),
        "max_abs_step_gap": max(abs(x) for x in d), "follows": all(abs(m) <= band for m in means),
    }


def compare(a: dict, b: dict, batches: int) -> dict:
    """Comparability, the loss test and the ranks' parameter check of runs `a` and `b`."""
    out = {"problems": comparable(a, b)}
    if not out["problems"]:
        try:
            out.update(compare_losses(a["loss"], b["loss"], batches))
        except ValueError as exc:
            out["problems"].append(str(exc))
            return out
        out["params_identical_on_ranks"] = a["params_identical_on_ranks"] and b["params_identical_on_ranks"]
    return out


def print_compare(c: dict, a: dict, b: dict, paths: list[Path]) -> None:
    def name(run):
        return f"N={run['world_size']} x batch {run['batch_per_rank']}"

    print(f"# loss curves: {name(a)} ({paths[0]}) vs {name(b)} ({paths[1]})")
    if c["problems"]:
        print("NOT COMPARABLE: " + "; ".join(c["problems"]))
        return
    verdict = "FOLLOW EACH OTHER within noise" if c["follows"] else "DIFFER by more than the noise"
    print(f"{verdict}: mean gap per batch of {c['steps'] // c['batches']} steps "
          f"{', '.join(f'{g:+.3g}' for g in c['batch_gaps'])}, each to be within +-{c['band_99']:.3g} (99% band; "
          f"per-step noise of the gap {c['step_noise']:.3g}); over all {c['steps']} steps {c['mean_gap']:+.3g} "
          f"({100 * c['relative_gap']:+.2f}% of the loss); largest single-step gap {c['max_abs_step_gap']:.3g}")
    print(f"same meshes in the same order at every step: yes; parameters bit-identical on every rank at the end: "
          f"{'yes' if c['params_identical_on_ranks'] else 'NO'}")


# ---------------------------------------------------------------------------------------------- merge
def _fmt(value, spec: str, none: str = "—") -> str:
    return none if value is None else format(value, spec)


def merge_table(runs: list[dict]) -> str:
    """Markdown table of runs; efficiency against an N = 1 run of the same config and R among them (one with
    the same batch per rank first; without any, the run's own `--reference` value)."""
    lines = ["| config | R | N (ranks) | batch per rank | global batch | steps timed | "
             "median s / step | steps/s | samples/s | scaling efficiency | peak GiB per rank (max) | "
             "params equal on ranks | device |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for run in runs:
        singles = [r for r in runs if r["world_size"] == 1 and r["config"] == run["config"]
                   and r["resolution"] == run["resolution"]]
        singles.sort(key=lambda r: r["batch_per_rank"] != run["batch_per_rank"])
        reference = singles[0] if singles else None
        eff = efficiency(run, reference) if reference is not None else run.get("efficiency")
        peak = max(run["peak_memory_gib"]) if run["peak_memory_gib"] else None
        device = run["machine"] + (f", {run['backend']}" if run["backend"] else "")
        lines.append(
            f"| {run['config']} | {run['resolution']} | {run['world_size']} | {run['batch_per_rank']} | "
            f"{run['global_batch']} | {run['timed_steps']} | {_fmt(run['median_step_s'], '.3f')} | "
            f"{_fmt(run['steps_per_s'], '.2f')} | {_fmt(run['samples_per_s'], '.2f')} | {_fmt(eff, '.2f')} | "
            f"{_fmt(peak, '.1f', 'n/a')} | {'yes' if run['params_identical_on_ranks'] else 'NO'} | {device} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--compare", type=Path, nargs=2, metavar=("A.json", "B.json"),
                      help="test whether B's loss curve follows A's (no run)")
    mode.add_argument("--merge", type=Path, nargs="+", metavar="RUN.json", help="markdown table of runs (no run)")
    ap.add_argument("--config", default="S", help="configs/<name>.yaml or a .yaml path")
    ap.add_argument("--resolution", type=int, default=512, help="training R (one stage)")
    ap.add_argument("--batch", type=int, default=None, help="meshes per process and step (default: the config's)")
    ap.add_argument("--steps", type=int, default=50, help="steps of the run, warm-up included (train.steps)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    ap.add_argument("--init-from", default=None, metavar="WEIGHTS", help="start from these weights (default: "
                    "the config's initialisation with train.seed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override after the benchmark's own (repeatable), e.g. data.source=corpus.safetensors")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop the run cleanly before this")
    ap.add_argument("--reference", type=Path, default=None, help="an N = 1 run's JSON: add the scaling efficiency")
    ap.add_argument("--batches", type=int, default=5, help="--compare: batch means of consecutive steps")
    ap.add_argument("--json", type=Path, default=None, help="write the run's (or comparison's) JSON here")
    return ap.parse_args(argv)


def write_json(obj: dict, path: Path | None) -> None:
    if path is not None:
        write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        print(merge_table([json.loads(p.read_text()) for p in args.merge]))
        return 0
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        c = {"a": str(args.compare[0]), "b": str(args.compare[1]), **compare(a, b, args.batches)}
        print_compare(c, a, b, args.compare)
        write_json(c, args.json)
        return 0 if not c["problems"] and c["follows"] else 1
    record = run_benchmark(args)
    if record is None:  # not rank 0
        return 0
    write_json(record, args.json)
    print(merge_table([record]))
    print(f"loss per step: {', '.join(_fmt(x, '.4g') for x in record['loss'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
