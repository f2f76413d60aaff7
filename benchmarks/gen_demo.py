"""Issue 12's GPU demonstration in one command: train the three generator models at demonstration size on the
32-mesh set, export them, assemble the generator and score it with bench_generation.py, inside a time budget.

    python benchmarks/gen_demo.py data          # here (needs /work/shared): the two packed mesh sets in .devdata/
    python benchmarks/gen_demo.py run --work /tmp/gen-demo --out $OUT      # on the GPU machine (docs/GENERATION.md)

`data` packs the training set, .devdata/gen32.safetensors (every 28th of the sorted base-mesh GLBs whose name is
not a held-out mesh's, 32 meshes, 0.16 MB), and the held-out set, .devdata/heldout8.safetensors (the first 8
held-out meshes by name, 1.1 MB): the GPU machine sees neither /work/shared nor more than 64 MiB of tree.

`run` stages, each a subprocess (its output in WORK/logs/STAGE.log):
    structure-vae    focusing train configs/gen-demo-structure-vae.yaml, then focusing export (fp16)
    structure-flow   the same with configs/gen-demo-structure-flow.yaml and structure_vae= the export above
    latent-flow      the same with configs/gen-demo-latent-flow.yaml and shape_vae= --shape-vae
    evaluation       WORK/generator/ (the three exports + a copy of --shape-vae) -> bench_generation.py
The configs' train.steps are the plan; the budget is the guard. A stage may use its planned minutes (PLAN) plus
whatever the stages before it left unused; the plans of the stages after it stay reserved. Trainings stop
cleanly by `focusing train --max-minutes` (a checkpoint, then the export), the evaluation by
`bench_generation.py --max-minutes`. The first stage that fails ends the chain; what exists is still packed.
`--stages` runs part of the chain (one device call per part, each with the whole budget): the exports a part
needs but does not make come from `--exports`, an earlier call's generator.tar unpacked, e.g.
    run ... --stages structure-vae,structure-flow          then, carrying the unpacked tar as .devdata/gen-a:
    run ... --stages latent-flow,evaluation --exports .devdata/gen-a

OUT gets at most 8 files, each < 16 MiB (what the GPU machine sends back): gen-demo.json (the table below),
generation.json, grid-train.png, grid-heldout.png (bench_generation.py's) and generator.tar (the three fp16
exports, every run's metrics.jsonl and the stage logs; without the exports if it would pass 16 MiB).
Prints a table: stage | status | steps | minutes | s / step | last loss | export MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's `focusing`, also without `pip install -e .`

TRAININGS = {  # stage -> (config, the --set that names the weights it needs)
    "structure-vae": ("configs/gen-demo-structure-vae.yaml", None),
    "structure-flow": ("configs/gen-demo-structure-flow.yaml", "structure_vae"),
    "latent-flow": ("configs/gen-demo-latent-flow.yaml", "shape_vae"),
}
PLAN = {"structure-vae": 1.5, "structure-flow": 2.75, "latent-flow": 2.75, "evaluation": 2.0}  # minutes
RESERVE_MINUTES = 0.2  # after the last stage: packing OUT
EXPORT_MINUTES = 0.35  # of a training stage's allowance, kept for its export (a fresh Python process)
GRACE_SECONDS = 5.0  # a subprocess is killed this long after its own --max-minutes
MIN_STAGE_MINUTES = 0.1
RETURN_FILES, RETURN_BYTES = 8, 16 * 2**20
TRAIN_SET, HELDOUT_SET = ".devdata/gen32.safetensors", ".devdata/heldout8.safetensors"
TRAIN_EVERY = 28


NEEDS = {"structure-vae": (), "structure-flow": ("structure-vae",), "latent-flow": (), "evaluation": tuple(TRAININGS)}


def stages_needed(stages: list[str]) -> list[str]:
    """The trainings whose exports `stages` need but do not make (they come from `--exports`)."""
    return [t for t in TRAININGS if t not in stages and any(t in NEEDS[s] for s in stages)]


def allowance(plan: dict[str, float], stage: str, elapsed_minutes: float, total_minutes: float) -> float:
    """Minutes stage `stage` may take: the total less what is spent, the reserve and the later stages' plans.
    A total below the plans' sum (+ the reserve) shrinks every plan by the same factor, so a short budget does
    not starve the first stage."""
    names = list(plan)
    scale = min(1.0, (total_minutes - RESERVE_MINUTES) / sum(plan.values()))
    later = scale * sum(plan[n] for n in names[names.index(stage) + 1:])
    return total_minutes - elapsed_minutes - RESERVE_MINUTES - later


# ---- data (here) -----------------------------------------------------------------------------------------------

def training_meshes(base: Path, heldout: Path) -> list[Path]:
    """The 32-mesh training set: every TRAIN_EVERY-th of the sorted GLBs of `base` whose stem is not the stem of
    a mesh in the held-out folder `heldout`."""
    held = {p.stem.lower() for p in heldout.iterdir()}
    return [p for p in sorted(base.glob("*.glb")) if p.stem.lower() not in held][::TRAIN_EVERY]


def heldout_meshes(heldout: Path, count: int) -> list[Path]:
    """The first `count` meshes of the held-out folder, by file name."""
    from focusing.io.mesh import LOAD_FORMATS

    return sorted(p for p in heldout.iterdir() if p.suffix.lower() in LOAD_FORMATS)[:count]


def pack_sets(base: Path, heldout: Path, out_dir: Path, heldout_count: int = 8) -> None:
    from focusing.data.corpus import pack_corpus

    for files, name, exclude in ((training_meshes(base, heldout), TRAIN_SET, [heldout]),
                                 (heldout_meshes(heldout, heldout_count), HELDOUT_SET, [])):
        report = pack_corpus(files, out_dir / Path(name).name, exclude=exclude)
        print(f"{report.path}: {report.packed} meshes ({report.bytes / 1e6:.2f} MB); skipped {len(report.skipped)}")


# ---- the chain (there) -----------------------------------------------------------------------------------------

def run_logged(cmd: list[str], log: Path, seconds: float) -> tuple[int, str]:
    """Run `cmd` (in ROOT, ROOT on PYTHONPATH) with its output in `log`, killed after `seconds`; returns (exit
    code, 124 when killed; the log's last line)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=max(seconds, 1.0)).returncode
        except subprocess.TimeoutExpired:
            code = 124
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return code, lines[-1] if lines else ""


def run_summary(run: Path) -> dict:
    """The checkpoint's step; last loss, median step time and data wait, peak memory of the run's metrics.jsonl."""
    from focusing.train.checkpoint import checkpoint_step

    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    row = {"steps": checkpoint_step(run / "checkpoint") if (run / "checkpoint").is_dir() else None}
    if not records:
        return row
    times = sorted(r["step_time"] for r in records if "step_time" in r)
    return {**row, "last_loss": records[-1].get("loss"),
            "median_step_s": times[len(times) // 2] if times else None,
            "median_data_wait_s": sorted(r.get("data_wait", 0.0) for r in records)[len(records) // 2],
            "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in records), default=0.0)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def train_stage(stage: str, args, work: Path, minutes: float, needs: str | None) -> dict:
    config, key = TRAININGS[stage]
    run, export = work / "runs" / stage, work / "generator" / stage
    cmd = [sys.executable, "-m", "focusing", "train", "--config", config, "--out", str(run), "--quiet",
           "--max-minutes", f"{max(minutes - EXPORT_MINUTES, MIN_STAGE_MINUTES):.3f}",
           "--set", f"data.source={args.train}"]
    cmd += ["--set", f"{key}={needs}"] if key else []
    cmd += [a for item in args.set if item.startswith(stage + ":") for a in ("--set", item.split(":", 1)[1])]
    cmd += [a for item in args.init if item.startswith(stage + "=") for a in ("--init-from", item.split("=", 1)[1])]
    cmd += ["--device", args.device] if args.device else []
    deadline = time.monotonic() + 60.0 * minutes
    code, last = run_logged(cmd, work / "logs" / f"{stage}.log", 60.0 * (minutes - EXPORT_MINUTES) + GRACE_SECONDS)
    row = {"status": "ok" if code == 0 else f"train failed ({code})", "detail": last, **run_summary(run)}
    if code == 0:
        code, last = run_logged([sys.executable, "-m", "focusing", "export", str(run), "-o", str(export)],
                                work / "logs" / f"{stage}-export.log",
                                max(deadline - time.monotonic(), 60.0 * EXPORT_MINUTES) + GRACE_SECONDS)
        if code:
            row.update(status=f"export failed ({code})", detail=last)
        else:
            row["export_bytes"] = folder_bytes(export)
    return row


def eval_stage(args, work: Path, minutes: float) -> dict:
    bench = work / "bench"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_generation.py"), "--checkpoint", str(work / "generator"),
           "--train", args.train, "--train-count", str(args.train_count), "--out", str(bench),
           "--steps", str(args.sampler_steps), "--cfg", str(args.cfg),
           "--max-minutes", f"{max(minutes - 0.1, MIN_STAGE_MINUTES):.3f}"]
    cmd += ["--heldout", args.heldout, "--heldout-count", str(args.heldout_count)] if args.heldout else []
    cmd += ["--device", args.device] if args.device else []
    code, last = run_logged(cmd, work / "logs" / "evaluation.log", 60.0 * minutes + GRACE_SECONDS)
    row = {"status": "ok" if code == 0 else f"failed ({code})", "detail": last}
    result = bench / "generation.json"
    if result.exists():
        row["summary"] = json.loads(result.read_text())["summary"]
    return row


def pack_outputs(work: Path, out: Path, summary: dict) -> None:
    """Copy the bench's files to OUT and write OUT/generator.tar (exports, metrics, logs) and OUT/gen-demo.json."""
    from focusing.io import atomic_path, write_bytes_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    for name in ("generation.json", "grid-train.png", "grid-heldout.png"):
        if (work / "bench" / name).exists():
            write_bytes_atomic(out / name, (work / "bench" / name).read_bytes())
    small = sorted((work / "runs").glob("*/metrics.jsonl")) + sorted((work / "logs").glob("*.log"))
    exports = [work / "generator" / s for s in TRAININGS if (work / "generator" / s).is_dir()]
    with_weights = sum(p.stat().st_size for p in small) + sum(folder_bytes(e) for e in exports) < RETURN_BYTES - 2**20
    with atomic_path(out / "generator.tar") as tmp, tarfile.open(tmp, "w") as tar:
        for path in small:
            tar.add(path, arcname=str(path.relative_to(work)))
        for folder in exports if with_weights else []:
            tar.add(folder, arcname=folder.name)
    summary["generator_tar"] = {"bytes": (out / "generator.tar").stat().st_size, "exports": with_weights}
    write_text_atomic(out / "gen-demo.json", json.dumps(summary, indent=1) + "\n")
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > RETURN_FILES or any(p.stat().st_size > RETURN_BYTES for p in files):
        print(f"warning: {out} holds {len(files)} files, more than the {RETURN_FILES} files / 16 MiB each that "
              f"come back")


def print_table(summary: dict) -> None:
    print("\n| stage | status | steps | minutes | s / step | last loss | export MB |\n|---|---|---|---|---|---|---|")
    for stage, r in summary["stages"].items():
        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        export = f"{r['export_bytes'] / 1e6:.2f}" if "export_bytes" in r else "-"
        print(f"| {stage} | {r['status']} | {num('steps', 'd')} | {num('minutes', '.2f')} | "
              f"{num('median_step_s', '.3f')} | {num('last_loss', '.4f')} | {export} |")
    evaluation = summary["stages"].get("evaluation", {}).get("summary", {})
    for label, s in evaluation.items():
        print(f"{label}: {s['meshes']} meshes (+{s['not_run']} not run), mean F@0.005 {s['mean_fscore']:.3f}, "
              f"{s['at_least_0.8']} with F >= 0.8")


def run_chain(args) -> dict:
    started = time.monotonic()
    work, out = Path(args.work), Path(args.out)
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"gen_demo: {work} is not empty: give a new --work folder")
    for corpus in filter(None, [args.train, args.heldout]):
        if not (ROOT / corpus).is_file():  # ROOT / an absolute path is that path
            raise SystemExit(f"gen_demo: no {corpus}: run `python benchmarks/gen_demo.py data` where /work/shared is")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = {stage: args.plan.get(stage, PLAN[stage]) for stage in args.stages}
    summary = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "args": vars(args),
               "plan_minutes": plan, "stages": {}}
    needs = {"structure-vae": None, "structure-flow": str(work / "generator" / "structure-vae"),
             "latent-flow": args.shape_vae}
    for stage in stages_needed(args.stages):
        shutil.copytree(Path(args.exports) / stage, work / "generator" / stage)
    try:
        for stage in plan:
            minutes = allowance(plan, stage, (time.monotonic() - started) / 60.0, args.minutes)
            if minutes < MIN_STAGE_MINUTES:
                summary["stages"][stage] = {"status": "no time left"}
                break
            t0 = time.monotonic()
            print(f"{stage}: up to {minutes:.2f} min", flush=True)
            if stage == "evaluation":
                shutil.copytree(ROOT / args.shape_vae, work / "generator" / "shape-vae")
                row = eval_stage(args, work, minutes)
            else:
                row = train_stage(stage, args, work, minutes, needs[stage])
            row["minutes"] = (time.monotonic() - t0) / 60.0
            summary["stages"][stage] = row
            print(f"{stage}: {row['status']} in {row['minutes']:.2f} min: {row.get('detail', '')}", flush=True)
            if row["status"] != "ok":
                break
    finally:
        summary["minutes"] = (time.monotonic() - started) / 60.0
        pack_outputs(work, out, summary)
        print_table(summary)
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="pack the training and held-out sets into .devdata/ (here)")
    d.add_argument("--base", default="/work/shared/data/base-meshes", help="the corpus's GLB folder")
    d.add_argument("--heldout", default="/work/shared/data/meshes", help="the held-out meshes' folder")
    d.add_argument("--out-dir", default=str(ROOT / ".devdata"))
    r = sub.add_parser("run", help="the chain (on the GPU machine)")
    r.add_argument("--work", required=True, help="a new folder for the runs, exports, generator and bench")
    r.add_argument("--out", required=True, help="folder of the files to bring back (<= 8, < 16 MiB each)")
    r.add_argument("--minutes", type=float, default=9.2, help="budget of the whole chain (default 9.2)")
    r.add_argument("--train", default=TRAIN_SET, help="training meshes (packed corpus)")
    r.add_argument("--heldout", default=HELDOUT_SET, help="held-out meshes ('' for none)")
    r.add_argument("--train-count", type=int, default=32)
    r.add_argument("--heldout-count", type=int, default=8)
    r.add_argument("--shape-vae", default="checkpoints/focusing-s")
    r.add_argument("--sampler-steps", type=int, default=25, help="Euler steps of each flow in the evaluation")
    r.add_argument("--cfg", type=float, default=6.0, help="guidance weight w of the evaluation (default 6)")
    r.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="a config override of one training, e.g. structure-vae:train.steps=3 (repeatable)")
    r.add_argument("--init", action="append", default=[], metavar="STAGE=FOLDER",
                   help="start that training from these weights (`focusing train --init-from`: an export or a "
                   "checkpoint, e.g. an earlier call's), with a fresh optimiser and schedule (repeatable)")
    r.add_argument("--plan", action="append", default=[], metavar="STAGE=MINUTES",
                   help=f"a stage's planned minutes instead of the default {PLAN} (repeatable); "
                   "--minutes stays the guard of the whole chain")
    r.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    r.add_argument("--stages", default=",".join(PLAN),
                   help="the stages to run, in the chain's order (default all): split the chain over device calls")
    r.add_argument("--exports", default=None,
                   help="a folder with the exports of the stages not run (an earlier call's generator.tar, "
                   "unpacked: structure-vae/, structure-flow/, latent-flow/)")
    args = p.parse_args(argv)
    if args.command == "run":
        args.stages = [s for s in args.stages.split(",") if s]
        order = list(PLAN).index
        if not args.stages or any(s not in PLAN for s in args.stages) or args.stages != sorted(args.stages, key=order):
            p.error(f"--stages: expected some of {','.join(PLAN)}, in that order")
        missing = [s for s in stages_needed(args.stages) if not (args.exports and (Path(args.exports) / s).is_dir())]
        if missing:
            p.error(f"--stages {','.join(args.stages)} needs the exports of {', '.join(missing)}: give --exports DIR")
        for item in args.set:
            if item.split(":", 1)[0] not in TRAININGS or "=" not in item:
                p.error(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE one of {', '.join(TRAININGS)}")
        for item in args.init:
            stage, _, folder = item.partition("=")
            if stage not in TRAININGS or not folder or not Path(folder).is_dir():
                p.error(f"--init {item!r}: expected STAGE=FOLDER with STAGE one of {', '.join(TRAININGS)} and "
                        f"FOLDER an existing export or checkpoint folder")
        plan = {}
        for item in args.plan:
            stage, _, minutes = item.partition("=")
            try:
                plan[stage] = float(minutes)
            except ValueError:
                plan[stage] = 0.0
            if stage not in PLAN or not plan[stage] > 0:
                p.error(f"--plan {item!r}: expected STAGE=MINUTES with STAGE one of {', '.join(PLAN)} and MINUTES > 0")
        args.plan = plan
    if args.command == "data":
        pack_sets(Path(args.base), Path(args.heldout), Path(args.out_dir))
        return None
    return run_chain(args)


if __name__ == "__main__":
    main()
