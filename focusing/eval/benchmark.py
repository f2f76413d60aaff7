"""`focusing benchmark`: one reconstruction method (`focusing.eval.baselines`) over a set of meshes, scored per mesh,
summarised by level like the paper's Table 1.

Output folder OUT:

    OUT/settings.json        settings of the results below (method and options, R, samples, thresholds, seed)
    OUT/results.csv          one row per mesh (`COLUMNS`)
    OUT/table.md             mean / std per level L1-L4 and over all meshes (`write_table`)
    OUT/meshes/<name>.ply    the predictions, in the GT's normalised frame [-0.5, 0.5]^3

Per mesh: load the GT and normalise it (`focusing.io`), its sharp-edge density and level (`focusing.eval.levels`),
the method's reconstruction (timed: `seconds`), saved atomically, then `surface_metrics` twice: the paper's protocol
(100K samples per surface, F@0.005: `chamfer`, `fscore`, `precision`, `recall`, `normal_consistency`) and a finer
one (1M samples, F@0.002: `*_fine`), where the 100K protocol's own sampling floor no longer hides differences.
Chamfer is stored raw (squared distances in the unit-cube frame); the table shows it in 1e-5 units. Other columns:
`gt_path` (absolute), `pred_path` (relative to OUT, empty if failed), `level` (1-4, empty if unknown),
`sharp_edge_density` and `level_measure` (its definition, `focusing.eval.levels.LEVEL_MEASURE`), `status`
(ok / failed), `error` (one line), `faces` (prediction), `gt_faces`, `metric_seconds`.

Semantics (the pattern of `focusing prepare`):
- `name` is the mesh's item id (`find_items`: file stem + hash of its relative path), made file-name safe.
- Resume: a mesh whose row is `ok` and whose prediction file exists is skipped. Rows are valid for the settings in
  settings.json; a run with other settings starts the table afresh (older predictions get overwritten as their
  meshes are redone). Rows of meshes not among this run's inputs are kept.
- A failing mesh (unreadable GT, a method error, out of memory) gets status `failed` and its one-line error; the
  run goes on, and the next run retries it.
- results.csv is rewritten (atomically) after every mesh; table.md at the end of a run.
- Levels are recomputed from the stored density at table time (`write_table`), and densities measured by another
  definition (or missing) are measured again, so new thresholds or a new measure only need
  `focusing benchmark --table-only --out OUT`.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from focusing.data.prepare import Item, find_items, run_pool
from focusing.errors import FocusingError, failure_message
from focusing.eval.baselines import make_method, method_identity
from focusing.eval.metrics import PAPER_SAMPLES, PAPER_THRESHOLD
from focusing.io.atomic import write_text_atomic

FORMAT_VERSION = 1
FINE_SAMPLES = 1_000_000
FINE_THRESHOLD = 0.002
LEVELS = (1, 2, 3, 4)
COLUMNS = (
    "name", "gt_path", "pred_path", "method", "resolution", "level", "sharp_edge_density", "level_measure", "status",
    "error",
    "seconds", "chamfer", "fscore", "precision", "recall", "normal_consistency", "fscore_fine", "chamfer_fine",
    "precision_fine", "recall_fine", "normal_consistency_fine", "faces", "gt_faces", "metric_seconds",
)


@dataclass(frozen=True)
class BenchmarkSettings:
    """What a result depends on: the method (name, options as strings), R, metric sample counts and the seed
    (surface sampling of the metrics; also given to the method, e.g. for the point cloud Poisson gets)."""

    method: str
    resolution: int
    options: tuple[tuple[str, str], ...] = ()
    samples: int = PAPER_SAMPLES
    fine_samples: int = FINE_SAMPLES
    seed: int = 0

    def __post_init__(self):
        if self.resolution < 4:
            raise FocusingError(f"resolution must be at least 4, got {self.resolution}")
        if self.samples < 1 or self.fine_samples < 1:
            raise FocusingError("sample counts must be positive")

    def identity(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            **method_identity(_method(self)),
            "resolution": self.resolution,
            "samples": self.samples,
            "threshold": PAPER_THRESHOLD,
            "fine_samples": self.fine_samples,
            "fine_threshold": FINE_THRESHOLD,
            "seed": self.seed,
        }


@functools.lru_cache(maxsize=1)
def _method(settings: BenchmarkSettings):
    """One method instance per process (a model loads once, not once per mesh)."""
    return make_method(settings.method, dict(settings.options))


def mesh_name(item: Item) -> str:
    """The file-name safe, unique name of an input mesh (its item id, odd characters replaced)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", item.id)


def _row(item: Item, settings: BenchmarkSettings) -> dict:
    return {"name": mesh_name(item), "gt_path": str(Path(item.path).resolve()), "method": settings.method,
            "resolution": settings.resolution}


def benchmark_mesh(item: Item, out_dir: str | Path, settings: BenchmarkSettings) -> dict:
    """Reconstruct and score one mesh; never raises for a bad mesh: returns its row (status ok / failed)."""
    from focusing.eval.levels import LEVEL_MEASURE, mesh_level
    from focusing.eval.metrics import surface_metrics
    from focusing.io import load_mesh, normalize, save_mesh

    row = _row(item, settings)
    pred_path = f"meshes/{row['name']}.ply"
    (Path(out_dir) / pred_path).unlink(missing_ok=True)  # a stale prediction must not outlive a failed redo
    try:
        gt, _ = normalize(load_mesh(item.path), item.path)
        row["gt_faces"] = len(gt.faces)
        row["level"], row["sharp_edge_density"] = mesh_level(gt)
        row["level_measure"] = LEVEL_MEASURE
        start = time.perf_counter()
        pred = _method(settings).reconstruct(gt, settings.resolution, seed=settings.seed)
        row["seconds"] = round(time.perf_counter() - start, 3)
        if len(pred.faces) == 0:
            raise FocusingError("the method returned an empty mesh")
        row["faces"] = len(pred.faces)
        save_mesh(pred, Path(out_dir) / pred_path)
        start = time.perf_counter()
        coarse = surface_metrics(pred, gt, settings.samples, PAPER_THRESHOLD, settings.seed, normalize=False)
        fine = surface_metrics(pred, gt, settings.fine_samples, FINE_THRESHOLD, settings.seed, normalize=False)
        row["metric_seconds"] = round(time.perf_counter() - start, 3)
        for key in ("chamfer", "fscore", "precision", "recall", "normal_consistency"):
            row[key] = getattr(coarse, key)
            row[f"{key}_fine"] = getattr(fine, key)
        return {**row, "pred_path": pred_path, "status": "ok"}
    except Exception as exc:  # noqa: BLE001  (a batch goes on: record any failure, e.g. out of memory)
        return {**row, "status": "failed", "error": failure_message(exc)}  # the GT's path is in the row already


def read_results(out_dir: str | Path) -> dict[str, dict]:
    """Rows of OUT/results.csv by name (all values strings, "" when empty); {} without the file."""
    path = Path(out_dir) / "results.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def write_results(out_dir: str | Path, rows: dict[str, dict]) -> None:
    """OUT/results.csv, sorted by name, atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for name in sorted(rows):
        writer.writerow({k: "" if rows[name].get(k) is None else rows[name].get(k) for k in COLUMNS})
    write_text_atomic(Path(out_dir) / "results.csv", text.getvalue())


@dataclass
class BenchmarkReport:
    """What a run did: meshes benchmarked now, skipped (already done), failed rows, and the table written."""

    done: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    table: str = ""


def run_benchmark(
    inputs: list[str | Path],
    out_dir: str | Path,
    settings: BenchmarkSettings,
    *,
    workers: int = 1,
    limit: int | None = None,
    progress: bool = True,
) -> BenchmarkReport:
    """Benchmark `settings.method` on the meshes in `inputs` (the first `limit`) into `out_dir`; see the module
    docstring. Writes results.csv after each mesh and table.md at the end."""
    from tqdm import tqdm

    items = find_items(inputs)
    items = items[:limit] if limit is not None else items
    out_dir = Path(out_dir)
    identity = settings.identity()
    settings_file = out_dir / "settings.json"
    rows = read_results(out_dir)
    if not settings_file.is_file() or json.loads(settings_file.read_text(encoding="utf-8")) != identity:
        rows = {}
        write_results(out_dir, rows)  # first the rows, then the settings they belong to
        write_text_atomic(settings_file, json.dumps(identity, indent=1) + "\n")
    report = BenchmarkReport()
    todo = []
    for item in items:
        row = rows.get(mesh_name(item))
        if row is not None and row["status"] == "ok" and (out_dir / row["pred_path"]).is_file():
            report.skipped += 1
        else:
            todo.append(item)

    bar = tqdm(total=len(todo), desc=f"{settings.method} R={settings.resolution}", unit="mesh",
               disable=not progress, file=sys.stderr)

    def record(row: dict) -> None:
        rows[row["name"]] = row
        write_results(out_dir, rows)
        if row["status"] == "ok":
            report.done += 1
        else:
            report.failed.append(row)
            bar.write(f"focusing benchmark: failed {row['gt_path']}: {row['error']}", file=sys.stderr)
        bar.update(1)

    def died(item: Item) -> dict:
        return {**_row(item, settings), "status": "failed", "error": "worker process died (out of memory?)"}

    try:
        if workers <= 1:
            for item in todo:
                record(benchmark_mesh(item, out_dir, settings))
        else:
            work = functools.partial(benchmark_mesh, out_dir=out_dir, settings=settings)
            run_pool(todo, work, workers, record, died=died)
    finally:
        bar.close()
        report.table = write_table(out_dir)
    return report


def _number(text) -> float | None:
    return None if text in ("", None) else float(text)


def _stats(values: list[float], scale: float = 1.0) -> tuple[str, str]:
    """Mean and (population) std of `values` / scale, formatted; dashes when empty."""
    if not values:
        return "-", "-"
    v = np.asarray(values) / scale
    return f"{v.mean():.4g}", f"{v.std():.4g}"


def write_table(out_dir: str | Path) -> str:
    """Regroup OUT/results.csv by `level_of(sharp_edge_density)` (rewriting its `level` column) and write
    OUT/table.md; returns the table. Rows whose GT loaded but whose density is missing or stale (another
    `LEVEL_MEASURE`) are measured again first (loading their GT; a failure leaves the level unknown)."""
    from focusing.eval.levels import LEVEL_MEASURE, level_of, mesh_level
    from focusing.io import load_mesh

    out_dir = Path(out_dir)
    rows = read_results(out_dir)
    if not rows:
        raise FocusingError(f"{out_dir / 'results.csv'}: no results to tabulate")
    for row in rows.values():
        stale = row["sharp_edge_density"] == "" or row.get("level_measure") != LEVEL_MEASURE
        if stale and row.get("gt_faces"):  # the GT loaded before
            try:
                row["sharp_edge_density"] = mesh_level(load_mesh(row["gt_path"]))[1]
                row["level_measure"] = LEVEL_MEASURE
            except Exception as exc:  # noqa: BLE001  (the table still gets written, with this level unknown)
                print(f"focusing benchmark: level of {row['gt_path']}: {exc}", file=sys.stderr)
                row["sharp_edge_density"] = row["level_measure"] = ""
        density = _number(row["sharp_edge_density"]) if row.get("level_measure") == LEVEL_MEASURE else None
        row["level"] = "" if density is None else level_of(density)
    write_results(out_dir, rows)
    settings_file = out_dir / "settings.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
    table = format_table(list(rows.values()), settings)
    write_text_atomic(out_dir / "table.md", table)
    return table


def format_table(rows: list[dict], settings: dict) -> str:
    """The Markdown table by level (rows as read from results.csv, `level` filled in)."""
    groups = [(f"L{level}", [r for r in rows if str(r["level"]) == str(level)]) for level in LEVELS]
    unknown = [r for r in rows if str(r["level"]) == ""]
    if unknown:
        groups.append(("unknown", unknown))
    groups.append(("all", rows))
    options = ", ".join(f"{k}={v}" for k, v in settings.get("options", {}).items()) or "none"
    failed = sum(r["status"] != "ok" for r in rows)
    samples, threshold = settings.get("samples", PAPER_SAMPLES), settings.get("threshold", PAPER_THRESHOLD)
    protocol = " (the paper's protocol)" if (samples, threshold) == (PAPER_SAMPLES, PAPER_THRESHOLD) else ""
    lines = [
        f"# Benchmark: {settings.get('method', '?')} at R = {settings.get('resolution', '?')}",
        "",
        f"{len(rows)} meshes ({failed} failed); method options: {options}.",
        "",
        f"- CD: Chamfer distance (squared L2, both directions) in 1e-5 units; F: F-score at {threshold}; NC: normal "
        f"consistency; all with {samples:,} samples per surface{protocol}.",
        f"- F fine, CD fine: {settings.get('fine_samples', FINE_SAMPLES):,} samples per surface, F at "
        f"{settings.get('fine_threshold', FINE_THRESHOLD)}.",
        "- n: meshes scored; failed: meshes that failed (left out of the statistics); std: population std; "
        "s: seconds of the method per mesh.",
        "",
        "| level | n | failed | CD mean | CD std | F mean | F std | F fine mean | F fine std | CD fine mean "
        "| NC mean | s mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, group in groups:
        ok = [r for r in group if r["status"] == "ok"]

        def col(key, scale=1.0):
            return _stats([float(r[key]) for r in ok], scale)

        cd, f, ff, cdf = col("chamfer", 1e-5), col("fscore"), col("fscore_fine"), col("chamfer_fine", 1e-5)
        cells = [label, str(len(ok)), str(len(group) - len(ok)), *cd, *f, *ff, cdf[0],
                 col("normal_consistency")[0], col("seconds")[0]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
