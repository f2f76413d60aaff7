"""Preprocessing cache: meshes in, one safetensors file per mesh plus index files out (`focusing prepare`).

Layout of a cache directory:

    DIR/items/<hh>/<id>.safetensors     one per mesh (hh: 2 hex digits of the id's hash, spreads big sets)
    DIR/index-<rank>-of-<world>.json    the items of one rank (ok and failed), merged on read (`read_index`)

An item file holds (all geometry in the normalised frame [-0.5, 0.5]^3):

    vertices f32 [V, 3], faces i32 [F, 3]   the normalised mesh (GT for rendering)
    points f32 [P, 3], normals f32 [P, 3]   oriented surface samples (`sample_surface`)
    voxels_<r> i16 [N, 3]                   exact voxels at r = R/4 (latent grid), R/2, R (`voxel_pyramid`)
    corners i16 [M, 3]                      corners of the R-level voxels (0..R, sorted, `voxel_corners`)
    tsdf f16 [M]                            corner TSDF in voxel units (x R), |tsdf| <= truncation_voxels
    normalization f64 [4]                   (cx, cy, cz, scale): x_norm = (x_source - c) * scale

int16 / float16 halve the largest arrays; the TSDF's float16 step is <= 2^-9 voxel for |tsdf| < 4 voxels.
The safetensors header metadata key "focusing" holds JSON: settings, source path and sha256, normalisation,
counts, timings. `focusing.data.dataset.ShapeDataset` turns items back into int32 / float32 tensors.

Semantics:
- Item ids are `<stem>-<10 hex of sha1(key)>`, key = the path relative to the input folder it was found in
  (prefixed by that folder's name), or the file name for files given directly: stable across machines.
- Done = the item file exists and its settings match (it is written to a temporary name and renamed, so it is
  complete). Re-running skips done items; items whose settings differ are redone. Temporaries that a killed run
  left beside this rank's items and index are removed at the start (`focusing.io.atomic.remove_temporaries`).
- An item that was cached but may teach nothing (its TSDF has no sign change, or no sample point lies in its
  voxels) is "ok" with a non-empty "warnings" list in its index entry and metadata, each logged as a warning;
  "checks" holds the numbers behind them (`item_checks`).
- A bad item (unreadable, empty, degenerate, ...) is logged with its reason, recorded in the index with
  status "failed", and the batch goes on; it is retried on the next run. `strict=True` (CLI `--strict`) makes
  the command exit 1 when any item failed; by default it exits 0 as long as the run itself worked.
- Sharding: item i belongs to rank int(sha1(key)[:8], 16) % world_size: deterministic and independent of
  the input order, so any launcher (SLURM array, torchrun, xargs) can run ranks 0..W-1 with the same inputs.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from focusing.data.sampling import DEFAULT_POINTS
from focusing.data.tsdf import DEFAULT_TRUNCATION_VOXELS
from focusing.errors import InputError, failure_message
from focusing.io.atomic import remove_temporaries, write_bytes_atomic, write_text_atomic
from focusing.io.mesh import LOAD_FORMATS

FORMAT_VERSION = 1
METADATA_KEY = "focusing"
STEPS = ("load", "sample", "voxelize", "tsdf", "write")


@dataclass(frozen=True)
class PrepareSettings:
    """What goes into an item. Every field but `device` is part of its identity (a change redoes the item)."""

    resolution: int = 512
    points: int = DEFAULT_POINTS
    truncation_voxels: float = DEFAULT_TRUNCATION_VOXELS
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.resolution < 4 or self.resolution % 4 or self.resolution > 32767:
            raise ValueError(f"resolution must be a multiple of 4 in [4, 32767], got {self.resolution}")
        if self.points < 1:
            raise ValueError(f"points must be positive, got {self.points}")

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("device")
        return {"format_version": FORMAT_VERSION, **d}


@dataclass(frozen=True)
class Item:
    """One input mesh: id (file stem + hash), key (stable relative name), path (as found)."""

    id: str
    key: str
    path: str

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.key.encode("utf-8")).hexdigest()

    def file(self, out_dir: str | os.PathLike) -> Path:
        return Path(out_dir) / "items" / self.digest[:2] / f"{self.id}.safetensors"


def _item(path: Path, key: str) -> Item:
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return Item(f"{path.stem}-{digest[:10]}", key, str(path))


def find_items(inputs: list[str | os.PathLike]) -> list[Item]:
    """Mesh files among `inputs` (files, or folders searched recursively for LOAD_FORMATS), sorted by key.

    Missing inputs, and inputs holding no mesh file, raise InputError. A file given directly is taken whatever its suffix (a bad one then fails
    as an item); in folders only known mesh suffixes count. A file found twice (same resolved path) or two
    files with the same key are kept once (the first).
    """
    found: list[tuple[str, Path]] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            root = path.resolve()
            for f in sorted(root.rglob("*")):
                if f.is_file() and f.suffix.lower() in LOAD_FORMATS and not f.name.startswith("."):
                    found.append((f"{root.name}/{f.relative_to(root).as_posix()}", f))
        elif path.exists():
            found.append((path.name, path))
        else:
            raise InputError(path, "no such file or folder")
    items: dict[str, Item] = {}
    seen: set[Path] = set()
    for key, path in found:
        if key not in items and path.resolve() not in seen:
            items[key] = _item(path, key)
            seen.add(path.resolve())
    if not items:
        raise InputError(inputs[0] if inputs else ".", f"no mesh files found (looked for {', '.join(LOAD_FORMATS)})")
    return sorted(items.values(), key=lambda i: i.key)


def assign(items: list[Item], rank: int, world_size: int) -> list[Item]:
    """The items of `rank` out of `world_size` (see module docstring); every item has exactly one rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world size {world_size}")
    return [i for i in items if int(i.digest[:8], 16) % world_size == rank]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _StepTimer:
    """Wall time per step (synchronising CUDA so GPU work is charged to its step) and CUDA peak memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.cuda_peak: dict[str, int] = {}
        self._last = time.perf_counter()

    def mark(self, step: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak[step] = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        now = time.perf_counter()
        self.seconds[step] = now - self._last
        self._last = now


def prepare_mesh(path: str | os.PathLike, settings: PrepareSettings, timer: _StepTimer | None = None):
    """Compute one item in memory: (tensors dict for the item file, metadata dict). See the module docstring."""
    from focusing.data.grid import voxel_corners
    from focusing.data.sampling import sample_surface
    from focusing.data.tsdf import corner_tsdf
    from focusing.data.voxelize import voxel_pyramid, with_batch
    from focusing.io import load_mesh, normalize

    device = torch.device(settings.device)
    timer = timer or _StepTimer(device)
    r = settings.resolution
    sha256 = file_sha256(path)
    mesh, norm = normalize(load_mesh(path), path)
    timer.mark("load")
    samples = sample_surface(mesh, settings.points, seed=settings.seed)
    timer.mark("sample")
    pyramid = voxel_pyramid(mesh, r, device=device)
    timer.mark("voxelize")
    corners = voxel_corners(with_batch(pyramid[r]))[0][:, 1:]
    tsdf = corner_tsdf(mesh, corners, r, settings.truncation_voxels, device=device)
    timer.mark("tsdf")
    checks = item_checks(samples.points, pyramid, tsdf)
    tensors = {
        "vertices": torch.from_numpy(mesh.vertices.astype(np.float32)),
        "faces": torch.from_numpy(mesh.faces.astype(np.int32)),
        "points": torch.from_numpy(samples.points),
        "normals": torch.from_numpy(samples.normals),
        **{f"voxels_{level}": coords.to("cpu", torch.int16) for level, coords in pyramid.items()},
        "corners": corners.to("cpu", torch.int16),
        "tsdf": (tsdf * r).to("cpu", torch.float16),
        "normalization": torch.tensor([*norm.center, norm.scale], dtype=torch.float64),
    }
    meta = {
        **settings.identity(),
        "source": str(path),
        "sha256": sha256,
        "levels": sorted(pyramid),
        "normalization": {"center": list(norm.center), "scale": norm.scale},
        "counts": {
            "vertices": len(mesh.vertices),
            "faces": len(mesh.faces),
            **{f"voxels_{level}": len(c) for level, c in pyramid.items()},
            "corners": len(corners),
        },
        "checks": checks,
        "warnings": item_warnings(checks, len(samples.points)),
    }
    return tensors, meta


def item_checks(points: np.ndarray, pyramid: dict[int, torch.Tensor], tsdf: torch.Tensor) -> dict:
    """What an item holds beyond its counts: the TSDF's signs, and how the sample points fill each level's voxels.

    Points are assigned like the encoder does (floor((p + 0.5) r), clamped to the grid): `points_outside_<r>`
    counts points in no active voxel, `empty_voxels_<r>` active voxels without a point.
    """
    from focusing.data.voxelize import _keys

    out = {"tsdf_negative": int((tsdf < 0).sum()), "tsdf_positive": int((tsdf > 0).sum())}
    p = torch.from_numpy(points)
    for level, coords in sorted(pyramid.items()):
        keys = _keys(coords.cpu(), level)  # sorted, unique
        cells = torch.unique(_keys(torch.floor((p + 0.5) * level).clamp_(0, level - 1), level), return_counts=True)
        at = torch.searchsorted(keys, cells[0]).clamp(max=max(len(keys) - 1, 0))
        held = keys[at] == cells[0] if len(keys) else torch.zeros_like(cells[0], dtype=torch.bool)
        out[f"points_outside_{level}"] = int(cells[1][~held].sum())
        out[f"empty_voxels_{level}"] = len(keys) - int(held.sum())
    return out


def item_warnings(checks: dict, points: int) -> list[str]:
    """One line per problem in `item_checks`: a TSDF without a sign change (no surface for the warm-up), no
    sample point in a level's voxels (nothing for the encoder), or more than 1% of the points outside them."""
    warnings = []
    if not (checks["tsdf_negative"] and checks["tsdf_positive"]):
        side = "negative" if checks["tsdf_negative"] else "positive or zero"
        warnings.append(f"the TSDF has no sign change (every corner {side}): no surface for the warm-up")
    for key in (k for k in checks if k.startswith("points_outside_")):
        level, outside = key.rsplit("_", 1)[-1], checks[key]
        if outside == points:
            warnings.append(f"no sample point lies in the active voxels at r = {level}")
        elif outside > 0.01 * points:
            warnings.append(f"{outside} of {points} sample points lie outside the active voxels at r = {level}")
    return warnings


def write_item(file: str | os.PathLike, tensors: dict, meta: dict) -> None:
    """Write an item atomically (our temporary name, then rename): a file under its final name is complete.
    Serialised in memory first: safetensors' `save_file` would write through a temporary of its own."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={METADATA_KEY: json.dumps(meta)})
    write_bytes_atomic(file, data)


def read_item_meta(file: str | os.PathLike) -> dict | None:
    """The metadata of an item file (header only), or None if it is missing or not a focusing item."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        return json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001  (a foreign or damaged file counts as not done)
        return None


def process_item(item: Item, out_dir: str | os.PathLike, settings: PrepareSettings) -> dict:
    """Prepare and write one item; never raises for a bad item: returns its index entry (status ok / failed)."""
    start = time.perf_counter()
    entry = {"id": item.id, "key": item.key, "source": item.path, "file": item.file(".").as_posix()}
    try:
        timer = _StepTimer(torch.device(settings.device))
        tensors, meta = prepare_mesh(item.path, settings, timer)
        meta.update(id=item.id, key=item.key)
        write_item(item.file(out_dir), tensors, meta)
        timer.mark("write")
        meta["seconds"] = {k: round(v, 4) for k, v in timer.seconds.items()}
        return {**entry, **meta, "status": "ok", "elapsed": round(time.perf_counter() - start, 3)}
    except Exception as exc:  # noqa: BLE001  (a batch goes on: record any failure, e.g. out of memory)
        return {**entry, "status": "failed", "error": failure_message(exc)}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


@dataclass
class PrepareReport:
    """What a run did: counts of items prepared now, skipped (already done) and failed, warnings, the index path."""

    prepared: int = 0
    skipped: int = 0
    warned: int = 0  # warnings logged for items prepared now (also in their index entries' "warnings")
    failed: list[dict] = field(default_factory=list)
    index: Path | None = None


def index_path(out_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    return Path(out_dir) / f"index-{rank:05d}-of-{world_size:05d}.json"


def prepare_dataset(
    inputs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    settings: PrepareSettings,
    *,
    workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> PrepareReport:
    """Prepare this rank's share of the meshes in `inputs` into `out_dir` (see the module docstring)."""
    from tqdm import tqdm

    items = assign(find_items(inputs), rank, world_size)
    out_dir = Path(out_dir)
    report = PrepareReport(index=index_path(out_dir, rank, world_size))
    removed = remove_temporaries([item.file(out_dir) for item in items] + [report.index])  # this rank's files only
    if removed:
        print(f"focusing prepare: removed {removed} temporary file(s) of a killed run", file=sys.stderr)
    entries: dict[str, dict] = {}
    todo = []
    for item in items:
        meta = read_item_meta(item.file(out_dir))
        if meta is not None and all(meta.get(k) == v for k, v in settings.identity().items()):
            entries[item.id] = {
                "id": item.id,
                "key": item.key,
                "file": item.file(".").as_posix(),
                **meta,
                "status": "ok",
            }
            report.skipped += 1
        else:
            todo.append(item)
    header = {"format_version": FORMAT_VERSION, "rank": rank, "world_size": world_size, **settings.identity()}

    def save_index() -> None:
        body = {**header, "items": [entries[k] for k in sorted(entries)]}
        write_text_atomic(report.index, json.dumps(body, indent=1) + "\n")

    def record(entry: dict, bar) -> None:
        entries[entry["id"]] = entry
        if entry["status"] == "ok":
            report.prepared += 1
            for warning in entry.get("warnings", []):
                report.warned += 1
                bar.write(f"focusing prepare: warning: {entry['source']}: {warning}", file=sys.stderr)
        else:
            report.failed.append(entry)
            bar.write(f"focusing prepare: failed {entry['source']}: {entry['error']}", file=sys.stderr)
        bar.update(1)

    bar = tqdm(total=len(todo), desc=f"prepare R={settings.resolution}", unit="mesh", disable=not progress)
    last_save = time.monotonic()
    try:
        if workers <= 1:
            for item in todo:
                record(process_item(item, out_dir, settings), bar)
                if time.monotonic() - last_save > 30:
                    save_index()
                    last_save = time.monotonic()
        else:
            run_pool(
                todo,
                functools.partial(process_item, out_dir=out_dir, settings=settings),
                workers,
                lambda e: record(e, bar),
            )
    finally:
        bar.close()
        save_index()
    return report


def run_pool(todo: list[Item], work, workers: int, record, died=None) -> None:
    """`record(work(item))` for every item, in `workers` spawned processes, at most 2 per worker in flight
    (`work` must be picklable). A worker that dies (killed for memory, crash) fails the items the pool had in
    flight (`record(died(item))`, by default a failed index entry); the pool is restarted and the batch goes on."""
    died = died or _died
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    queue = list(reversed(todo))
    while queue:
        with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
            running: dict[cf.Future, Item] = {}
            broken = False
            while (queue or running) and not broken:
                while queue and len(running) < 2 * workers and not broken:
                    item = queue.pop()
                    try:
                        running[pool.submit(work, item)] = item
                    except cf.process.BrokenProcessPool:
                        queue.append(item)
                        broken = True
                if not running:
                    break
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    item = running.pop(future)
                    try:
                        record(future.result())
                    except cf.process.BrokenProcessPool:
                        broken = True
                        record(died(item))
            for item in running.values():  # the pool broke: everything still in flight is lost
                record(died(item))


def _died(item: Item) -> dict:
    return {
        "id": item.id,
        "key": item.key,
        "source": item.path,
        "file": item.file(".").as_posix(),
        "status": "failed",
        "error": "worker process died (out of memory?)",
    }


def read_index(cache_dir: str | os.PathLike) -> list[dict]:
    """All entries of a cache's index files (every rank), one per id ("ok" wins over "failed"), sorted by id.

    Without index files (e.g. a run killed before writing one), the item files' own metadata is used.
    """
    cache_dir = Path(cache_dir)
    entries: dict[str, dict] = {}
    files = sorted(cache_dir.glob("index-*-of-*.json"))
    for f in files:
        for entry in json.loads(f.read_text(encoding="utf-8"))["items"]:
            if entry["id"] not in entries or entry["status"] == "ok":
                entries[entry["id"]] = entry
    if not files:
        for f in sorted(cache_dir.glob("items/*/*.safetensors")):
            meta = None if f.name.startswith(".") else read_item_meta(f)  # skip temporaries of killed runs
            if meta is not None:
                entries[meta["id"]] = {**meta, "file": f.relative_to(cache_dir).as_posix(), "status": "ok"}
    return [entries[k] for k in sorted(entries)]
