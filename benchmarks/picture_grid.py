"""A results picture from `focusing report` renders: one row per mesh, one column per (benchmark folder, kind).

    python benchmarks/picture_grid.py --meshes bunny fandisk office_chair steel_ladder --view 0 \
        --column GT=val-closed:gt --column "no hole closing=val-open:pred" --column "hole closing=val-closed:pred" \
        --column "error=val-closed:error" -o docs/images/vae_S_step3674_256.png

Each column reads BENCH_DIR/report/<name>/view_<k>_<kind>.png (kind gt, pred or error), <name> the benchmark's
name of the mesh (the file stem plus a hash: a mesh is matched by its stem). Run `focusing report BENCH_DIR` first.
Pillow only; the PNG is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABEL_HEIGHT = 28


def report_picture(bench_dir: Path, mesh: str, view: int, kind: str) -> Path:
    """The report's PNG of `mesh` (file stem) in `bench_dir`; one clear error when there is none."""
    from focusing.errors import FocusingError

    found = sorted((bench_dir / "report").glob(f"{mesh}-*/view_{view}_{kind}.png"))
    if len(found) != 1:
        raise FocusingError(f"{bench_dir}: {len(found)} report pictures of {mesh} (view {view}, {kind}); run "
                            "`focusing report` on it first")
    return found[0]


def grid(meshes: list[str], columns: list[tuple[str, Path, str]], view: int) -> Image.Image:
    """rows = meshes, columns = (label, benchmark folder, kind), labels on top."""
    cells = [[Image.open(report_picture(d, m, view, kind)).convert("RGB") for _, d, kind in columns] for m in meshes]
    w, h = cells[0][0].size
    out = Image.new("RGB", (w * len(columns), LABEL_HEIGHT + h * len(meshes)), "white")
    draw = ImageDraw.Draw(out)
    for j, (label, _, _) in enumerate(columns):
        draw.text((j * w + 8, 8), label, fill="black")
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            out.paste(cell.resize((w, h)), (j * w, LABEL_HEIGHT + i * h))
    return out


def _column(text: str) -> tuple[str, Path, str]:
    label, _, rest = text.partition("=")
    folder, _, kind = rest.rpartition(":")
    if not label or not folder or kind not in ("gt", "pred", "error"):
        raise argparse.ArgumentTypeError(f"expected LABEL=BENCH_DIR:KIND (KIND gt, pred or error), got {text!r}")
    return label, Path(folder), kind


def main(argv=None) -> int:
    from focusing.errors import FocusingError
    from focusing.io.atomic import atomic_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meshes", nargs="+", required=True, help="mesh file stems, one row each")
    p.add_argument("--column", type=_column, action="append", required=True, metavar="LABEL=BENCH_DIR:KIND")
    p.add_argument("--view", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    try:
        picture = grid(args.meshes, args.column, args.view)
    except FocusingError as exc:
        print(f"picture_grid: error: {exc}", file=sys.stderr)
        return 1
    with atomic_path(args.output) as tmp:
        picture.save(tmp, format="PNG")
    print(f"wrote {args.output}: {picture.size[0]} x {picture.size[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
