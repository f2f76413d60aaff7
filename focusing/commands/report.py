"""`focusing report BENCH_DIR`: the HTML page of a benchmark run (GT vs prediction pictures, error views, numbers)."""

from __future__ import annotations

import argparse

from focusing.commands.checks import check_output_folder, device, int_at_least, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML page of a benchmark run: GT and prediction side by side, error views, numbers",
        description="Reads BENCH_DIR/results.csv (and table.md if present) and writes BENCH_DIR/report/index.html "
        "with a summary by level, the failed meshes, and per mesh the GT and the prediction rendered from the same "
        "views (normals as RGB), the prediction coloured by its distance to the GT surface (0 to 0.01), and the "
        "metrics. Opens from disk in any browser. Pictures that are newer than their meshes and made with the same "
        "settings are kept, so running it again is cheap.",
    )
    p.add_argument("bench_dir", metavar="BENCH_DIR", help="benchmark output folder (holds results.csv)")
    p.add_argument("--views", type=positive_int, default=3, help="views per mesh (default 3)")
    p.add_argument("--resolution", type=int_at_least(8), default=384, help="picture size in pixels (default 384)")
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from focusing.eval.report import write_report

    check_output_folder(Path(args.bench_dir) / "report")  # before rendering the pictures
    index = write_report(args.bench_dir, views=args.views, resolution=args.resolution, device=args.device,
                         progress=not args.quiet)
    print(f"wrote {index}")
    return 0
