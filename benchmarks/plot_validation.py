"""The validation curve of a training campaign: mean F-score against GPU-minutes, one PNG (Pillow only).

    python benchmarks/plot_validation.py docs/training/focusing-s-validation.tsv -o docs/images/focusing-s-validation.png

The TSV has one row per validated export: gpu_minutes, step, fscore (F@0.005), fscore_fine (F@0.002),
normal_consistency, results (the benchmark CSV). Dashed lines: the issue's goals and the baselines, from
`--lines NAME=VALUE` (default: the goal 0.955, sdf-mc 0.957 and Poisson 0.942 at 256, F@0.005).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `focusing`

from focusing.io.atomic import atomic_path  # noqa: E402

SERIES = (("fscore", "F@0.005", (31, 119, 180)), ("fscore_fine", "F@0.002", (255, 127, 14)),
          ("normal_consistency", "NC", (44, 160, 44)))
DEFAULT_LINES = ("goal F@0.005=0.955", "sdf-mc F@0.005=0.957", "Poisson F@0.005=0.942")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = [{k: float(v) if k != "results" else v for k, v in r.items()} for r in csv.DictReader(f, delimiter="\t")]
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return sorted(rows, key=lambda r: r["gpu_minutes"])


def plot(rows: list[dict], lines: dict[str, float], out: Path, size=(720, 440)) -> None:
    """Draw the curves (x: GPU-minutes from 0, y: 0..1 scaled to the data) and write `out` atomically."""
    w, h = size
    left, right, top, bottom = 60, 150, 20, 40
    image = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(image)
    x_max = 5 * math.ceil(max(r["gpu_minutes"] for r in rows) * 1.1 / 5) or 5
    values = [r[key] for r in rows for key, _, _ in SERIES] + list(lines.values())
    y_min = max(0.0, min(values) - 0.05)
    px = lambda x: left + (w - left - right) * x / x_max  # noqa: E731
    py = lambda y: h - bottom - (h - top - bottom) * (y - y_min) / (1.0 - y_min)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        y = y_min + (1.0 - y_min) * i / 5
        d.text((8, py(y) - 6), f"{y:.3f}", fill="black")
        x = x_max * i / 5
        d.text((px(x) - 8, h - bottom + 6), f"{x:.0f}", fill="black")
    d.text(((w - right) / 2, h - 16), "GPU-minutes", fill="black")
    label_y = -math.inf
    for name, value in sorted(lines.items(), key=lambda item: -item[1]):  # labels top-down, never overlapping
        for x in range(left, w - right, 12):
            d.line([x, py(value), x + 6, py(value)], fill=(120, 120, 120))
        label_y = max(py(value) - 6, label_y + 13)
        d.text((w - right + 6, label_y), f"{name} {value:.3f}", fill=(90, 90, 90))
    for k, (key, label, colour) in enumerate(SERIES):
        points = [(px(r["gpu_minutes"]), py(r[key])) for r in rows]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.text((w - right - 70, h - bottom - 48 + 14 * k), label, fill=colour)  # legend, bottom right
    with atomic_path(out) as tmp:
        image.save(tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tsv", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--lines", nargs="*", default=list(DEFAULT_LINES), metavar="NAME=VALUE")
    args = p.parse_args(argv)
    lines = {}
    for spec in args.lines:
        name, _, value = spec.rpartition("=")
        lines[name] = float(value)
    plot(read_rows(args.tsv), lines, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
