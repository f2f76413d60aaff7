"""`focusing prepare INPUT... --out DIR --resolution R`: meshes -> cached training items (see focusing.data.prepare)."""

from __future__ import annotations

import argparse
import os

from focusing.commands.checks import device, non_negative_int, output_folder, positive_float, positive_int


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return default


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="preprocess meshes into a training cache (points, voxel pyramid, corner TSDF)",
        description="Normalises each mesh into [-0.5, 0.5]^3 and writes DIR/items/<hh>/<id>.safetensors with the "
        "normalised mesh, oriented surface samples, the exact voxels at R/4, R/2 and R, and the truncated SDF "
        "at the corners of the R-level voxels; plus DIR/index-<rank>-of-<world>.json. Resumable: items already "
        "written with the same settings are skipped (already done); temporaries left by a killed run are removed. "
        "One cache folder holds one set of settings: a run whose --resolution, --points, --truncation or --seed "
        "differ from the cache's index files is refused (use another --out). An item's id is its file stem plus a "
        "hash of the name it was given under: a file given directly is named by its file name, a file found in a "
        "folder by FOLDER/relative path, so give every run (and every rank) the same inputs. A bad mesh is "
        "reported as 'failed' with its reason and the run goes on; exit code 1 when no item is ready (every one "
        "failed), else 0 (failures logged), or 1 with --strict if any failed.",
        epilog="Sharding: run ranks 0..W-1 with the same inputs (e.g. a SLURM array: --rank $SLURM_ARRAY_TASK_ID "
        "--world-size $SLURM_ARRAY_TASK_COUNT); each item belongs to exactly one rank. --rank/--world-size "
        "default to $RANK/$WORLD_SIZE (torchrun) or $SLURM_PROCID/$SLURM_NTASKS, else 0/1.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="mesh files, or folders searched recursively")
    p.add_argument("--out", type=output_folder, required=True, help="cache folder (created if missing)")
    p.add_argument("--resolution", type=positive_int, default=512,
                   help="grid resolution R, a multiple of 4 (default 512)")
    p.add_argument("--points", type=positive_int, default=819_200, help="surface samples per mesh (default 819200)")
    p.add_argument("--truncation", type=positive_float, default=3.0,
                   help="TSDF truncation in voxels at R, positive (default 3)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", type=device, default="auto",
                   help="torch device for voxelisation and TSDF: auto, cpu, cuda, cuda:N")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--rank", type=non_negative_int, default=None, help="this shard's rank (see below)")
    p.add_argument("--world-size", type=positive_int, default=None, help="number of shards (see below)")
    p.add_argument("--strict", action="store_true", help="exit with code 1 if any item failed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def check_same_settings(out_dir, identity: dict) -> None:
    """Refuse (FocusingError) a cache folder whose index files were written with other settings than `identity`."""
    import json
    from pathlib import Path

    from focusing.errors import InputError

    for index in sorted(Path(out_dir).glob("index-*-of-*.json")):
        try:
            header = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(index, "unreadable index file of this cache") from None
        changed = [f"{k} {header.get(k)} (now {v})" for k, v in identity.items() if header.get(k) != v]
        if changed:
            raise InputError(index, f"this cache was prepared with {', '.join(changed)}; one cache folder holds "
                             "one set of settings: give another --out")


def run(args: argparse.Namespace) -> int:
    import sys

    from focusing.data.prepare import PrepareSettings, prepare_dataset
    from focusing.errors import FocusingError

    device = args.device
    rank = args.rank if args.rank is not None else _env_int("RANK", "SLURM_PROCID", default=0)
    world = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    try:
        settings = PrepareSettings(args.resolution, args.points, args.truncation, args.seed, device)
    except ValueError as exc:
        raise FocusingError(str(exc)) from None
    if not 0 <= rank < world:
        raise FocusingError(f"need 0 <= rank < world size, got rank {rank}, world size {world}")
    check_same_settings(args.out, settings.identity())
    report = prepare_dataset(
        args.inputs, args.out, settings, workers=args.workers, rank=rank, world_size=world, progress=not args.quiet
    )
    print(
        f"prepared {report.prepared}, skipped {report.skipped} (already done), failed {len(report.failed)}; "
        f"index: {report.index}",
        file=sys.stderr,
    )
    nothing_ready = report.failed and not (report.prepared or report.skipped)
    return 1 if nothing_ready or (args.strict and report.failed) else 0
