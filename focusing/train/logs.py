"""What a run writes while it trains: scalar records (`metrics.jsonl` always, TensorBoard when the optional
`tensorboard` package is installed) and PNG grids of the objective's images (`images/step-NNNNNNN.png`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from focusing.io.atomic import write_text_atomic
from focusing.render.images import save_png

METRICS = "metrics.jsonl"
LABEL_HEIGHT = 14
GRID_COLUMNS = 4


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Scalar records of one run folder. On resume the records after the resumed step (written by a run that
    stopped before its next checkpoint) are dropped, so the file reads as one unbroken run."""

    def __init__(self, out_dir: str | os.PathLike, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional `tensorboard` extra is not installed
            return
        purge = None if resume_step is None else resume_step + 1
        self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Append one record {"step": step, **scalars}."""
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)

    def image(self, step: int, images: dict[str, torch.Tensor]) -> Path:
        """Save the grid of `images` as images/step-NNNNNNN.png (and to TensorBoard); returns the PNG path."""
        grid = image_grid(images)
        path = self.out_dir / "images" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(grid, path)
        if self.tensorboard is not None:
            self.tensorboard.add_image("images", grid, step, dataformats="HWC")
        return path

    def close(self) -> None:
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def image_grid(images: dict[str, torch.Tensor], columns: int = GRID_COLUMNS) -> np.ndarray:
    """Images {name: [H, W, 3] float in 0..1} -> one uint8 [H', W', 3] grid, in dict order, `columns` per row,
    each tile under a strip with its name (white background; tiles of different sizes are padded)."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("image_grid needs at least one image")
    tiles = []
    for name, image in images.items():
        a = image.detach().float().cpu().clamp(0, 1).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"image {name!r} must be [H, W, 3], got {list(a.shape)}")
        tiles.append((name, np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8)))
    height = max(t.shape[0] for _, t in tiles) + LABEL_HEIGHT
    width = max(t.shape[1] for _, t in tiles)
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (name, tile) in enumerate(tiles):
        x, y = (i % columns) * width, (i // columns) * height
        canvas.paste(Image.fromarray(tile), (x, y + LABEL_HEIGHT))
        draw.text((x + 2, y + 1), name, fill=(0, 0, 0))
    return np.asarray(canvas)
