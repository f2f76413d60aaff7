"""`focusing benchmark --method M --data DIR --resolution R --out OUT`: a reconstruction method over meshes, scored
per mesh and tabulated by level (see focusing.eval.benchmark)."""

from __future__ import annotations

import argparse

from focusing.commands.checks import output_folder, positive_int


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


# The names of `focusing.eval.baselines.METHODS`, spelled out so that `focusing --help` need not import torch
# (tests/test_cli_help.py checks both the list and that).
METHOD_NAMES = ("fit", "gt-resample", "poisson", "sdf-mc", "vae")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="run a reconstruction method over meshes and score it (Chamfer, F-score by level)",
        description="Normalises each mesh into [-0.5, 0.5]^3, reconstructs it with the method at resolution R, saves "
        "OUT/meshes/<name>.ply (normalised frame) and scores it against the GT: the paper's protocol (100K samples, "
        "F@0.005), a finer F@0.002 and Chamfer with 1M samples, normal consistency. Writes OUT/results.csv (one row "
        "per mesh), OUT/table.md (mean / std by level L1-L4) and, unless --no-report, the HTML report. Resumable: "
        "meshes already done with the same settings are skipped (already done); a failing mesh is recorded with its "
        "error and the run goes on. Exit code 1 when no mesh has a result (every one failed), else 0 (failures "
        "logged and in results.csv).",
        epilog="Methods: gt-resample (the GT itself: the metric's floor), poisson (screened Poisson of the 819,200 "
        "oriented points the VAE gets, depth log2 R, density-trimmed; needs pymeshlab), sdf-mc (flood fill + "
        "marching cubes at R), fit (SparseFlex field fitted by render loss at R; slow on CPU). Method options, e.g. "
        "--option trim=none (poisson), --option steps=200 (fit), --option device=cuda; vae (the Focusing VAE: "
        "encode the oriented points, decode at R; --checkpoint FOLDER, default the shipped one; --option "
        "close_holes=false leaves the pinholes); --checkpoint PATH is "
        "--option checkpoint=PATH, for the methods that take one. See focusing.eval.baselines.",
    )
    p.add_argument("--method", choices=METHOD_NAMES, help="reconstruction method")
    p.add_argument("--data", nargs="+", metavar="PATH", help="mesh files, or folders searched recursively")
    p.add_argument("--resolution", "-r", type=positive_int, help="grid resolution R (e.g. 256)")
    p.add_argument("--out", type=output_folder, required=True, help="output folder (created if missing)")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable)")
    p.add_argument("--checkpoint", help="model checkpoint, for methods that take one")
    p.add_argument("--samples", type=positive_int, default=100_000,
                   help="samples per surface of the paper's protocol (100000)")
    p.add_argument("--fine-samples", type=positive_int, default=1_000_000,
                   help="samples per surface of F@0.002 (1000000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the metrics' sampling and of the method (default 0)")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N meshes (sorted by path)")
    p.add_argument("--table-only", action="store_true", help="only rebuild OUT/table.md (and the levels of "
                   "OUT/results.csv) from the results, measuring missing or stale sharp-edge densities")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def check_options(method: str, options: dict[str, str]) -> None:
    """Refuse (FocusingError) what the method cannot take, before any work: a checkpoint for a method without a
    `checkpoint` option (naming those that have one), an unknown option, a device this machine lacks."""
    import dataclasses

    from focusing.commands.checks import check_device
    from focusing.errors import FocusingError
    from focusing.eval.baselines import METHODS, make_method

    takes = sorted(n for n, cls in METHODS.items() if "checkpoint" in {f.name for f in dataclasses.fields(cls)})
    if "checkpoint" in options and method not in takes:
        which = (f"only {', '.join(takes)} {'takes' if len(takes) == 1 else 'take'} one" if takes
                 else "no method takes one yet")
        raise FocusingError(f"method {method} takes no checkpoint ({which})")
    make_method(method, options)  # unknown options, values of the wrong type
    if "device" in options:
        check_device(options["device"])


def run(args: argparse.Namespace) -> int:
    import sys

    from focusing.errors import FocusingError
    from focusing.eval.benchmark import BenchmarkSettings, run_benchmark, write_table

    if args.table_only:
        print(write_table(args.out), end="")
    else:
        missing = [f"--{k}" for k in ("method", "data", "resolution") if getattr(args, k) is None]
        if missing:
            raise FocusingError(f"{', '.join(missing)} required (or --table-only)")
        options = dict(args.option)
        if args.checkpoint is not None:
            options["checkpoint"] = args.checkpoint
        check_options(args.method, options)
        settings = BenchmarkSettings(args.method, args.resolution, tuple(sorted(options.items())), args.samples,
                                     args.fine_samples, args.seed)
        report = run_benchmark(args.data, args.out, settings, workers=args.workers, limit=args.limit,
                               progress=not args.quiet)
        print(report.table, end="")
        print(f"benchmarked {report.done}, skipped {report.skipped} (already done), failed {len(report.failed)}; "
              f"results in {args.out / 'results.csv'}", file=sys.stderr)
        if report.failed and not (report.done or report.skipped):
            return 1  # nothing to report on
    if not args.no_report:
        try:
            from focusing.eval.report import write_report
        except ModuleNotFoundError as exc:
            if exc.name != "focusing.eval.report":
                raise
            print("focusing benchmark: no HTML report (focusing.eval.report is not installed)", file=sys.stderr)
        else:
            write_report(args.out)
    return 0
