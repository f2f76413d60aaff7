"""Training-step cost of the Focusing VAE per voxel selection: carving + zoom against TripoSF's frustum (issue 10).

    python benchmarks/bench_train_step.py --device cuda --configs B,S --resolutions 256,512 --json out.json
    python benchmarks/bench_train_step.py --device cuda --configs B --meshes fandisk --resolutions 1024 \\
        --modes carve+zoom --steps 1 --no-inference --profile --trace trace.json     # one profiled step
    python benchmarks/bench_train_step.py --merge a.json b.json --json all.json --plot memory.png
    python benchmarks/bench_train_step.py --quick                                    # CPU smoke run, ~1 min

One case = (config, mesh, R, mode). The batch is built on the device by the trainer's data path
(`focusing.data.online.build_sample` + `collate`: the normalised mesh, no augmentation, the config's point
count, the exact voxel pyramid at R/4, R/2, R) once per (mesh, R, points) and its build time is reported. A step
is the trainer's forward + backward (`VAEObjective` under bf16 autocast on CUDA, fp32 on the CPU, after the TSDF
warm-up: `step` >= loss.tsdf_steps), without the optimiser (no AdamW state: add 8 bytes per parameter, 1.4 GB
for B). Modes (`--modes`): none, frustum (TripoSF's sectional training, unzoomed camera), frustum+zoom (the
frustum of the zoomed camera), carve, carve+zoom. The camera of step i is drawn from a generator seeded by
(seed, i) in every mode, and `focusing.carving.select_voxels` chooses the zoom on the carved set in every
zoomed mode, so frustum+zoom and carve+zoom see the same pixels. `--checkpointing` picks the memory savings (the
same result up to float rounding): config (the YAML's), none, pointnet (only the PointNet in chunks of
`--pointnet-chunk` points, recomputed), blocks (each transformer block recomputed in the backward pass), all
(blocks recomputed in chunks of whole windows of `--block-chunk` voxels, the PointNet in chunks of whole voxels
of `--pointnet-chunk` points, and with `--block-group G` runs of G blocks checkpointed as one more level: less
memory for one more forward of the blocks; `--offload` keeps those runs' inputs in host memory). `--compile`
fuses the per-element math of the blocks, the PointNet and the renderer with torch.compile
(`focusing.device.use_torch_compile`, as `train.compile`; the same math, the warm-up compiles).

Per case: latent voxels encoded and decoded, voxels at R/2 and R, predicted triangles rendered (medians over the
steps), peak CUDA memory (`torch.cuda.max_memory_allocated`, reset after the warm-up), median forward+backward
ms of `--steps` steps after `--warmup`, ratios against `frustum` (and the zoomed modes against frustum+zoom), and
a breakdown of each step (`PhaseTimer`: CUDA events on CUDA, perf_counter on the CPU; outermost phase only, the
rest of the forward is "other"). A case that runs out of CUDA memory is reported as OOM and the run goes on.
Inference: `focusing.inference.reconstruct_mesh` (tiled) at `--inference-resolutions` on the meshes and on a
~1.1M-face mesh (bunny midpoint-subdivided twice, `bench_prepare.mesh_path("bunny_x16")`).

The weights are random (initialised with the seed, not trained). A training step's cost does not depend on the
weights' values (children are pruned by the GT occupancy, the decoded set by the selection), except through the
predicted mesh's triangle count; at inference the upsamplers prune by their (random) logits, so the output
voxel and face counts, hence the decoder's fine levels and the extraction, are not those of a trained model:
`--checkpoint FOLDER` adds the inference cases with trained weights (e.g. the shipped focusing-S), whose sizes
are; `--configs ''` leaves the random-weight models out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from focusing import losses  # noqa: E402
from focusing.data.online import build_sample, collate  # noqa: E402
from focusing.data.sampling import DEFAULT_POINTS  # noqa: E402
from focusing.device import use_torch_compile  # noqa: E402
from focusing.io import load_mesh, normalize, write_text_atomic  # noqa: E402
from focusing.models import vae as vae_module  # noqa: E402
from focusing.models.vae import FocusingVAE, count_parameters  # noqa: E402
from focusing.train import objective as objective_module  # noqa: E402
from focusing.train.experiment import load_experiment  # noqa: E402
from focusing.train.objective import VAEObjective  # noqa: E402

MODES = {"none": ("none", False), "frustum": ("frustum", False), "frustum+zoom": ("frustum", True),
         "carve": ("carve", False), "carve+zoom": ("carve", True)}
REFERENCE = "frustum"
SAME_VIEW = {"frustum+zoom": "frustum+zoom", "carve+zoom": "frustum+zoom", "carve": "frustum", "none": "frustum"}
MESHES = {  # name -> why (MANIFEST.tsv category)
    "nefertiti": "detailed scan (detail, 70K faces)",
    "fandisk": "CAD part (cad)",
    "cycloidal_drive": "many parts, inner structure (multi, 119 parts)",
    "balloon_whisk": "thin wires (thin, open)",
    "beetle_car_shell": "open shell (open)",
}
BIG_MESH = "bunny_x16"  # ~1.1M faces (bench_prepare)
QUICK_MESHES = ["fandisk", "balloon_whisk"]  # also in tests/data
PHASES = ("pointnet", "encoder", "carve_depth", "selection", "decoder", "upsample", "head", "extract", "render_gt",
          "render_pred", "losses", "other", "backward")
MODULE_PHASES = {"pointnet": "pointnet", "encoder": "encoder", "decoder": "decoder", "upsample": "upsample",
                 "head": "head"}
CHECKPOINTING = ("config", "none", "pointnet", "blocks", "all")
MIN_STEPS = 3  # measured steps a case keeps when --case-seconds cuts it short
POINTNET_CHUNK = 262_144  # default points per checkpointed PointNet chunk of --checkpointing all
BLOCK_CHUNK = 131_072  # voxels per block chunk of --checkpointing all: B recomputes ~5.5 GiB (41.7 GiB per 1M)


# ---------------------------------------------------------------------------------------------- phase timing
class PhaseTimer:
    """Time spent in named phases of a step: forward hooks on the model's parts and wrappers around the
    objective's calls (`install`), outermost phase only. CUDA: event pairs read after the step (no sync inside
    the step); CPU: perf_counter. Each phase is also a `record_function` range ("phase:<name>") for the profiler."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.depth = 0
        self.active: str | None = None
        self.spans: list[tuple[str, object, object]] = []
        self._range = None
        self._start = None

    def mark(self):
        """A point in time: a recorded CUDA event, or perf_counter seconds on the CPU."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed(self, start, stop) -> float:
        """Milliseconds between two marks (after a synchronise on CUDA)."""
        return start.elapsed_time(stop) if self.cuda else (stop - start) * 1e3

    def begin(self, name: str) -> None:
        self.depth += 1
        if self.depth == 1:
            self.active, self._start = name, self.mark()
            self._range = torch.autograd.profiler.record_function(f"phase:{name}")
            self._range.__enter__()

    def end(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._range.__exit__(None, None, None)
            self.spans.append((self.active, self._start, self.mark()))

    @contextlib.contextmanager
    def phase(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name(*args, **kwargs) if callable(name) else name):
                return fn(*args, **kwargs)
        return timed

    def read(self) -> dict[str, float]:
        """Milliseconds per phase of the spans recorded since the last `read` (synchronises on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = dict.fromkeys(PHASES, 0.0)
        for name, start, stop in self.spans:
            out[name] += self.elapsed(start, stop)
        self.spans = []
        return out

    @contextlib.contextmanager
    def install(self, model: FocusingVAE):
        """Hooks on model.pointnet / encoder / decoder / upsample / head; the objective's GT depth for carving,
        voxel selection and renders (GT under no_grad, prediction with grad), SparseFlex extraction and losses."""
        handles = []
        for attr, name in MODULE_PHASES.items():
            module = getattr(model, attr)
            for part in module if isinstance(module, torch.nn.ModuleList) else [module]:  # a list is never called
                handles.append(part.register_forward_pre_hook(lambda *_, n=name: self.begin(n)))
                handles.append(part.register_forward_hook(lambda *_: self.end()))
        render = objective_module.render_mesh
        patches = [
            mock.patch.object(objective_module, "gt_depth_for_carving",
                              self.wrap("carve_depth", objective_module.gt_depth_for_carving)),
            mock.patch.object(objective_module, "select_voxels",
                              self.wrap("selection", objective_module.select_voxels)),
            mock.patch.object(objective_module, "render_mesh",
                              self.wrap(lambda *a, **k: "render_pred" if torch.is_grad_enabled() else "render_gt",
                                        render)),
            mock.patch.object(vae_module, "sparseflex_mesh", self.wrap("extract", vae_module.sparseflex_mesh)),
            mock.patch.object(losses, "vae_loss", self.wrap("losses", losses.vae_loss)),
        ]
        try:
            with contextlib.ExitStack() as stack:
                for p in patches:
                    stack.enter_context(p)
                yield self
        finally:
            for h in handles:
                h.remove()


# ---------------------------------------------------------------------------------------------- host syncs
SYNC_OPS = {"aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::_local_scalar_dense", "aten::bincount"}


class OpCounter(TorchDispatchMode):
    """Aten ops one step dispatches, per phase of `timer` (its outermost; "other" outside every phase of the
    forward, "backward" while the autograd engine runs), and the host syncs among them: ops after which the host waits
    for the device because it reads a size or a value the device computes (SYNC_OPS: nonzero, unique,
    masked_select, bincount, item / bool(tensor); boolean-mask indexing; repeat_interleave without output_size;
    copies from the device to the host). Each sync is also counted by its call site, the innermost frame in
    focusing/ ("autograd" in the backward). A CPU run counts the same ops (it just does not wait) except where the
    GPU takes another route: the Triton renderer and conv, the varlen attention kernel."""

    def __init__(self, timer: PhaseTimer):
        super().__init__()
        self.timer = timer
        self.ops: dict[str, int] = {}
        self.syncs: dict[str, int] = {}
        self.sites: dict[tuple[str, str], int] = {}

    @staticmethod
    def is_sync(func, args, kwargs) -> bool:
        name = func._schema.name
        if name in SYNC_OPS:
            return True
        if name == "aten::repeat_interleave":
            return kwargs.get("output_size", args[3] if len(args) > 3 else None) is None
        if name in ("aten::index", "aten::index_put", "aten::index_put_"):
            return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if name in ("aten::_to_copy", "aten::copy_"):
            src = args[1] if name == "aten::copy_" else args[0]
            dst = args[0].device if name == "aten::copy_" else kwargs.get("device") or src.device
            return torch.is_tensor(src) and src.device.type != "cpu" and torch.device(dst).type == "cpu"
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.startswith("profiler::"):  # PhaseTimer's own record_function ranges
            return func(*args, **kwargs)
        backward = torch._C._current_graph_task_id() != -1  # inside the autograd engine
        phase = "backward" if backward else (self.timer.active if self.timer.depth else "other")
        self.ops[phase] = self.ops.get(phase, 0) + 1
        if self.is_sync(func, args, kwargs):
            self.syncs[phase] = self.syncs.get(phase, 0) + 1
            site = "autograd" if backward else next(
                (f"{Path(f.filename).relative_to(ROOT)}:{f.lineno}" for f in reversed(traceback.extract_stack())
                 if Path(f.filename).is_relative_to(ROOT / "focusing")), "?")
            key = (site, func._schema.name)
            self.sites[key] = self.sites.get(key, 0) + 1
        return func(*args, **kwargs)


def count_ops(model, objective, batch, device, seed: int, index: int, first_step: int, top: int) -> dict:
    """One step under `OpCounter`: aten ops and host syncs per phase, and the `top` sync sites; printed."""
    timer = PhaseTimer(device)
    counter = OpCounter(timer)
    with timer.install(model), counter:  # train_step less its reading of the logs (syncs of its own)
        with autocast(device):
            result = objective(model, batch, step=first_step + index, generator=step_generator(device, seed, index))
        result.loss.float().backward()
    model.zero_grad(set_to_none=True)
    timer.read()
    phases = {p: {"ops": counter.ops.get(p, 0), "syncs": counter.syncs.get(p, 0)} for p in PHASES}
    sites = sorted(counter.sites.items(), key=lambda kv: -kv[1])[:top]
    out = {"ops": sum(counter.ops.values()), "syncs": sum(counter.syncs.values()), "phases": phases,
           "sync_sites": [{"site": s, "op": op, "count": n} for (s, op), n in sites]}
    print(f"  aten ops {out['ops']:,}, host syncs {out['syncs']:,}; per phase (ops / syncs): "
          + ", ".join(f"{p} {v['ops']:,} / {v['syncs']}" for p, v in phases.items() if v["ops"]), flush=True)
    for row in out["sync_sites"]:
        print(f"    {row['count']:5d}  {row['op']:28s} {row['site']}")
    return out


# ---------------------------------------------------------------------------------------------- set-up
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def mesh_folders(meshes: Path | None) -> list[Path]:
    shared = Path("shared") / "data" / "meshes"
    candidates = [meshes] if meshes else [ROOT / shared, ROOT.parent / shared, Path("/work") / shared]
    return [p for p in candidates if p.is_dir()] + [ROOT / "tests" / "data"]


def find_mesh(name: str, folders: list[Path], workdir: Path) -> Path:
    """A `<name>.ply` of the first folder holding it, or `<base>_x16` (bench_prepare's subdivided mesh)."""
    if name.endswith("_x16"):
        import bench_prepare

        bench_prepare.SHARED = folders[0]
        return bench_prepare.mesh_path(name, workdir)
    for folder in folders:
        if (folder / f"{name}.ply").is_file():
            return folder / f"{name}.ply"
    raise SystemExit(f"bench_train_step: {name}.ply not found in {', '.join(map(str, folders))} (use --meshes)")


def experiment(name: str, checkpointing: str, image: int | None, pointnet_chunk: int = POINTNET_CHUNK,
               block_chunk: int = BLOCK_CHUNK, block_group: int = 0, offload: bool = False):
    """The experiment config `name` (configs/<name>.yaml or a path) with the checkpointing variant applied:
    config (as written), none, pointnet (PointNet chunks of `pointnet_chunk` points only), blocks (transformer
    blocks), all (blocks in checkpointed chunks of whole windows of `block_chunk` voxels, runs of `block_group`
    blocks checkpointed as one, their inputs in host memory if `offload` (then no stored blocks: the runs recompute),
    PointNet chunks of `pointnet_chunk` points)."""
    path = Path(name) if name.endswith(".yaml") else ROOT / "configs" / f"{name}.yaml"
    cfg = load_experiment(path)
    if checkpointing != "config":
        cfg.model.use_checkpoint = checkpointing in ("blocks", "all")
        cfg.model.pointnet_chunk = pointnet_chunk if checkpointing in ("pointnet", "all") else 0
        cfg.model.block_chunk = block_chunk if checkpointing == "all" else 0
        cfg.model.block_group = block_group if checkpointing == "all" else 0
        cfg.model.block_offload = offload and checkpointing == "all"
        if cfg.model.block_offload or cfg.model.block_group > 1:
            cfg.model.store_rows = 0
    if image:
        cfg.views.image_size = image
    return cfg


def build_batch(path: Path, resolution: int, points: int, device: torch.device, seed: int) -> tuple[dict, float]:
    """The trainer's batch of one normalised mesh (no augmentation) at R, and its build time in seconds."""
    mesh, _ = normalize(load_mesh(path), path)
    sync(device)
    t0 = time.perf_counter()
    sample = build_sample(mesh, resolution=resolution, points=points, device=device, augment=None, key=(seed, 0))
    batch = collate([sample], [path.stem], resolution)
    sync(device)
    return batch, time.perf_counter() - t0


def step_generator(device: torch.device, seed: int, index: int) -> torch.Generator:
    """The generator of step `index` (its camera, posterior noise and zoom draws), the same in every mode."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(model, objective, batch, device, seed: int, index: int, first_step: int) -> dict:
    """One forward + backward as the trainer does it (no optimiser step); returns the objective's logs."""
    with autocast(device):
        result = objective(model, batch, step=first_step + index, generator=step_generator(device, seed, index))
    result.loss.float().backward()
    model.zero_grad(set_to_none=True)
    return {k: (float(v) if torch.is_tensor(v) else v) for k, v in result.logs.items()}


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


# ---------------------------------------------------------------------------------------------- one case
def measure_case(model, objective, batch, device, *, steps: int, warmup: int, seed: int, first_step: int,
                 case_seconds: float | None = None, profile: int = 0, trace: Path | None = None,
                 ops: int = 0) -> dict:
    """Warm-up, then `steps` timed steps (phase breakdown on each; fewer, but at least MIN_STEPS, when they take
    longer than `case_seconds` together), then optionally one profiled step and one step counting its ops."""
    for i in range(warmup):
        train_step(model, objective, batch, device, seed, i, first_step)
    free_memory(device)
    base = _reset_peak(device)
    timer = PhaseTimer(device)
    rows = []
    measured_from = time.perf_counter()
    with timer.install(model):
        for i in range(warmup, warmup + steps):
            if case_seconds and len(rows) >= MIN_STEPS and time.perf_counter() - measured_from > case_seconds:
                break
            sync(device)
            t0 = time.perf_counter()
            start = timer.mark()
            with autocast(device):
                result = objective(model, batch, step=first_step + i, generator=step_generator(device, seed, i))
            loss = result.loss.float()
            forward_end = timer.mark()
            loss.backward()
            backward_end = timer.mark()
            sync(device)
            total_ms = (time.perf_counter() - t0) * 1e3
            model.zero_grad(set_to_none=True)
            phases = timer.read()
            phases["other"] = max(timer.elapsed(start, forward_end) - sum(phases.values()), 0.0)
            phases["backward"] = timer.elapsed(forward_end, backward_end)
            logs = {k: (float(v) if torch.is_tensor(v) else v) for k, v in result.logs.items()}
            del result, loss
            rows.append({"ms": total_ms, "logs": logs, "phases": phases})
    out = summarise(rows)
    out.update(status="ok", base_gib=base, peak_gib=peak_gib(device))
    if profile:
        out["profile"] = profile_step(model, objective, batch, device, seed, warmup + steps, first_step, profile,
                                      trace)
    if ops:
        out["ops"] = count_ops(model, objective, batch, device, seed, warmup + steps, first_step, ops)
    return out


def summarise(rows: list[dict]) -> dict:
    def med(values):
        return statistics.median(values)

    logs = rows[0]["logs"]
    counts = {
        "encoded": med(r["logs"]["voxels/n_latent"] for r in rows),
        "decoded": med(r["logs"]["voxels/decoded_latent"] for r in rows),
        "mid": med(r["logs"]["voxels/mid"] for r in rows),
        "full": med(r["logs"]["voxels/full"] for r in rows),
        "triangles": med(r["logs"]["mesh/faces"] for r in rows),
        "carved": med(r["logs"]["voxels/n_carve"] for r in rows) if "voxels/n_carve" in logs else None,
        "zoomed_steps": sum(int(r["logs"].get("voxels/zoomed_items", 0) > 0) for r in rows),
    }
    ms = med(r["ms"] for r in rows)
    return {
        **counts,
        "ms": ms,
        "ms_all": [r["ms"] for r in rows],
        "phases_ms": {k: med(r["phases"][k] for r in rows) for k in PHASES},
        # steps 1.5x slower than the median (one-time compilations, allocator stalls), phase by phase
        "slow_steps": [{"step": i, "ms": r["ms"], "phases_ms": {k: r["phases"][k] for k in PHASES}}
                       for i, r in enumerate(rows) if r["ms"] > 1.5 * ms],
        "steps": len(rows),
        "loss_terms": sorted(k for k in logs if k.startswith("loss/")),
    }


def profile_step(model, objective, batch, device, seed: int, index: int, first_step: int, top: int,
                 trace: Path | None) -> list[dict]:
    """One step under torch.profiler: print the top `top` entries by CUDA (CPU: CPU) total time, optionally
    write a chrome trace; returns the entries."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    timer = PhaseTimer(device)
    with profile(activities=activities) as prof, timer.install(model):
        train_step(model, objective, batch, device, seed, index, first_step)
        sync(device)
    timer.read()
    cuda = device.type == "cuda"
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=top), flush=True)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
        print(f"wrote chrome trace {trace}")

    def device_ms(e) -> float:
        return getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1e3

    events = sorted(prof.key_averages(), key=device_ms if cuda else (lambda e: e.cpu_time_total), reverse=True)
    return [{"name": e.key, "calls": e.count, "cpu_ms": e.cpu_time_total / 1e3,
             "cuda_ms": device_ms(e) if cuda else None} for e in events[:top]]


def run_case(model, objective, batch, device, **kwargs) -> dict:
    """`measure_case`, or {"status": "oom", ...} when it runs out of CUDA memory (memory freed, run goes on)."""
    try:
        return measure_case(model, objective, batch, device, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        message = str(exc).strip().splitlines()[0][:200]
    model.zero_grad(set_to_none=True)
    peak = peak_gib(device)
    free_memory(device)
    return {"status": "oom", "error": message, "peak_gib": peak}


def _label(row: dict) -> str:
    """A row's config as the tables name it: "B (all) compiled"."""
    return (row["config"] + ("" if row["checkpointing"] == "config" else f" ({row['checkpointing']})")
            + (" compiled" if row.get("compiled") else "")
            + (f" >= {row['compile_min_rows']:,} rows" if row.get("compile_min_rows") else "")
            + (" bf16-stream" if row.get("stream_dtype", "float32") != "float32" else "")
            + (f" storing {row['store_rows']:,} rows" if row.get("store_rows") else ""))


# ---------------------------------------------------------------------------------------------- ratios
def add_ratios(rows: list[dict]) -> None:
    """Per row: `vs_frustum` and `vs_same_view` (zoomed modes against frustum+zoom) ratios of the counts, peak
    memory and time, against the row of the same (config, checkpointing, mesh, R); None where either is missing."""
    keys = ("decoded", "mid", "full", "triangles", "peak_gib", "ms")
    index = {(r["config"], r["checkpointing"], r["mesh"], r["resolution"], r["mode"]): r for r in rows}
    for r in rows:
        for label, ref_mode in (("vs_frustum", REFERENCE), ("vs_same_view", SAME_VIEW.get(r["mode"], REFERENCE))):
            ref = index.get((r["config"], r["checkpointing"], r["mesh"], r["resolution"], ref_mode))
            ok = ref is not None and ref.get("status") == "ok" and r.get("status") == "ok"
            r[label] = {k: (r[k] / ref[k] if ok and r.get(k) is not None and ref.get(k) else None) for k in keys}


# ---------------------------------------------------------------------------------------------- inference
def run_inference(model, path: Path, resolution: int, points: int, tile: int | None, device) -> dict:
    """Seconds and peak memory of `reconstruct_mesh` (encode + tiled decode + extraction) on one mesh."""
    from focusing.errors import FocusingError
    from focusing.inference import reconstruct_mesh

    mesh = load_mesh(path)
    timer = PhaseTimer(device)
    encoded = []
    hook = model.encoder.register_forward_pre_hook(lambda _m, args: encoded.append(len(args[0])))
    try:
        free_memory(device)
        base = _reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        with timer.install(model):
            out = reconstruct_mesh(model, mesh, resolution, points=points, tile=tile, normalized=True, path=path)
        sync(device)
        seconds = time.perf_counter() - t0
        phases = {k: v for k, v in timer.read().items() if v}
        return {"status": "ok", "seconds": seconds, "base_gib": base, "peak_gib": peak_gib(device),
                "latent": encoded[0] if encoded else None, "faces": len(out.faces), "phases_ms": phases,
                "input_faces": len(mesh.faces)}
    except torch.cuda.OutOfMemoryError as exc:
        error, status = str(exc).strip().splitlines()[0][:200], "oom"
    except FocusingError as exc:
        error, status = str(exc), "error"
    finally:
        hook.remove()
    peak = peak_gib(device)
    free_memory(device)
    return {"status": status, "error": error, "peak_gib": peak, "input_faces": len(mesh.faces)}


# ---------------------------------------------------------------------------------------------- output
def _fmt(value, spec=",.0f", none="—"):
    return none if value is None else format(value, spec)


def train_table(rows: list[dict]) -> str:
    head = ("config", "mesh", "R", "mode", "encoded", "decoded", "R/2 voxels", "R voxels", "triangles", "peak GiB",
            "ms fwd+bwd", "decoded / frustum", "peak / frustum", "ms / frustum", "zoomed")
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---|" + "---:|" * (len(head) - 4)]
    for r in rows:
        cells = [_label(r), r["mesh"], str(r["resolution"]), r["mode"]]
        if r["status"] != "ok":
            cells += [r["status"].upper()] + [""] * 4 + [_fmt(r.get("peak_gib"), ".1f")] + [""] * 5
        else:
            v = r["vs_frustum"]
            cells += [_fmt(r["encoded"]), _fmt(r["decoded"]), _fmt(r["mid"]), _fmt(r["full"]), _fmt(r["triangles"]),
                      _fmt(r["peak_gib"], ".2f"), _fmt(r["ms"], ".0f"), _fmt(v["decoded"], ".2f"),
                      _fmt(v["peak_gib"], ".2f"), _fmt(v["ms"], ".2f"), f"{r['zoomed_steps']}/{r['steps']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phase_table(rows: list[dict]) -> str:
    head = ("config", "mesh", "R", "mode") + PHASES + ("transformer share of fwd",)
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---|" + "---:|" * (len(head) - 4)]
    for r in rows:
        if r["status"] != "ok":
            continue
        p = r["phases_ms"]
        forward = sum(v for k, v in p.items() if k != "backward")
        share = (p["encoder"] + p["decoder"]) / forward if forward else math.nan
        cells = [_label(r), r["mesh"], str(r["resolution"]), r["mode"]] + [f"{p[k]:.1f}" for k in PHASES]
        lines.append("| " + " | ".join(cells + [f"{share:.0%}"]) + " |")
    return "\n".join(lines)


def inference_table(rows: list[dict]) -> str:
    lines = ["| config | mesh | input faces | R | latent | output faces | s | peak GiB | slowest phases (ms) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['mesh']} | {r['input_faces']:,} | {r['resolution']} | "
                         f"{r['status'].upper()}: {r['error'][:60]} | | | {_fmt(r.get('peak_gib'), '.1f')} | |")
            continue
        slow = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["phases_ms"].items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"| {r['config']} | {r['mesh']} | {r['input_faces']:,} | {r['resolution']} | {_fmt(r['latent'])} "
                     f"| {r['faces']:,} | {r['seconds']:.2f} | {_fmt(r['peak_gib'], '.2f')} | {slow} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """Peak memory against R per mode: one panel per (config, mesh), a row per config, OOM as x at the top."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"bench_train_step: matplotlib is not importable, no plot written to {path}", file=sys.stderr)
        return False
    rows = [r for r in results["train"] if r["status"] in ("ok", "oom")]
    configs = sorted({(r["config"], r["checkpointing"]) for r in rows})
    meshes = list(dict.fromkeys(r["mesh"] for r in rows))
    fig, axes = plt.subplots(max(len(configs), 1), max(len(meshes), 1), squeeze=False,
                             figsize=(3.4 * max(len(meshes), 1), 2.9 * max(len(configs), 1)))
    capacity = results.get("gpu_gib")
    top = capacity or max([r.get("peak_gib") or 0 for r in rows] + [1.0])
    for (config, ckpt), line_axes in zip(configs, axes):
        for mesh, ax in zip(meshes, line_axes):
            sel = [r for r in rows if (r["config"], r["checkpointing"], r["mesh"]) == (config, ckpt, mesh)]
            if not sel:
                ax.set_axis_off()
                continue
            for i, mode in enumerate(MODES):
                ok = sorted((r["resolution"], r["peak_gib"]) for r in sel if r["mode"] == mode and r["status"] == "ok")
                oom = sorted(r["resolution"] for r in sel if r["mode"] == mode and r["status"] == "oom")
                color = f"C{i}"
                if ok:
                    ax.plot(*zip(*ok), marker="o", color=color, label=mode)
                if oom:
                    ax.scatter(oom, [top] * len(oom), marker="x", s=50, color=color,
                               label=None if ok else f"{mode} OOM")
            if capacity:
                ax.axhline(capacity, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.05 * top)
            ax.set_title(f"{config}" + ("" if ckpt == "config" else f" ({ckpt})") + f", {mesh}", fontsize=9)
            ax.set_xlabel("R", fontsize=8)
            ax.set_ylabel("peak GiB (x = OOM)", fontsize=8)
            ax.legend(fontsize=6)
    fig.suptitle(f"peak memory of a training step, {results.get('machine', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def print_all(results: dict) -> None:
    if results["train"]:
        print("\n## Training step (median over the steps; ratios against frustum in the same run)\n")
        print(train_table(results["train"]))
        print("\n## Where a step goes (median ms per phase; 'other' = rest of the forward)\n")
        print(phase_table(results["train"]))
    if results["inference"]:
        print("\n## Inference: reconstruct_mesh, tiled (random weights, whose output sizes are not a trained model's, "
              "except the rows marked trained)\n")
        print(inference_table(results["inference"]))


def write_json(results: dict, path: Path | None) -> None:
    if path is not None:
        write_text_atomic(path, json.dumps(results, indent=1) + "\n")


def merge(paths: list[Path]) -> dict:
    """Results of several runs (their train / inference rows concatenated; ratios recomputed)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {k: v for k, v in runs[0].items() if k not in ("train", "inference")}
    out["train"] = [r for run in runs for r in run["train"]]
    out["inference"] = [r for run in runs for r in run["inference"]]
    out["merged_from"] = [str(p) for p in paths]
    add_ratios(out["train"])
    return out


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--configs", default="B,S",
                    help="comma-separated configs/<name>.yaml (or .yaml paths), random weights ('' = none)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="also the inference cases with these trained weights (an export folder, e.g. "
                    "checkpoints/focusing-s): output sizes of a trained model")
    ap.add_argument("--checkpointing", default="config",
                    help=f"comma-separated variants of {CHECKPOINTING}: config (as the YAML says), none, pointnet "
                    f"(PointNet chunks only), blocks (transformer blocks), all (blocks in checkpointed chunks of "
                    f"whole windows of --block-chunk voxels + PointNet in checkpointed chunks of --pointnet-chunk "
                    f"points)")
    ap.add_argument("--pointnet-chunk", type=int, default=POINTNET_CHUNK,
                    help="points per PointNet chunk of 'pointnet' and 'all'")
    ap.add_argument("--block-chunk", type=int, default=BLOCK_CHUNK,
                    help="voxels per transformer-block chunk of 'all' (VAEConfig.block_chunk)")
    ap.add_argument("--block-group", type=int, default=0,
                    help="blocks per outer checkpoint of 'all' (VAEConfig.block_group; 0: none; recorded in the "
                    "JSON's settings)")
    ap.add_argument("--offload", action="store_true",
                    help="with 'all' and --block-group: the runs' inputs wait in pinned host memory for the backward "
                    "(VAEConfig.block_offload)")
    ap.add_argument("--stream-dtype", default=None, choices=("float32", "autocast"),
                    help="the transformers' residual stream (VAEConfig.stream_dtype; default: the config's)")
    ap.add_argument("--store-rows", type=int, default=None,
                    help="per transformer, voxel-blocks of activations kept instead of recomputed "
                    "(VAEConfig.store_rows; default: the config's)")
    ap.add_argument("--compile-min-rows", type=int, default=0,
                    help="with --compile: transformer blocks on fewer voxels run uncompiled (use_torch_compile's "
                    "min_rows)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the hot spots' per-element math (focusing.device.use_torch_compile, as "
                         "train.compile)")
    ap.add_argument("--meshes", type=Path, default=None, help="folder of the shared meshes (default: found)")
    ap.add_argument("--names", default=",".join(MESHES), help="comma-separated mesh names")
    ap.add_argument("--resolutions", default="256,512,1024,2048", help="training R ('' = no training cases)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--image", type=int, default=518, help="render size (square)")
    ap.add_argument("--points", type=int, default=None, help="points per mesh (default: the config's data.points)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--case-seconds", type=float, default=None,
                    help=f"stop measuring a case after this many seconds of steps (keeping >= {MIN_STEPS} steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inference-resolutions", default="512,1024,1536,2048", help="'' = no inference")
    ap.add_argument("--inference-names", default=None, help=f"default: --names + {BIG_MESH}")
    ap.add_argument("--inference-points", type=int, default=None, help="default: reconstruct's 819,200")
    ap.add_argument("--tile", type=int, default=64, help="latent voxels per decoding tile (0: untiled)")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--profile", action="store_true", help="one more step per case under torch.profiler")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--trace", type=Path, default=None, help="chrome trace of the profiled step (per case suffix)")
    ap.add_argument("--count-ops", action="store_true",
                    help="one more step per case counting aten ops and host syncs per phase, and the sync sites")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new case after this")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: tiny config, R = 32/64, 2 meshes, 2 steps, 64^2 images, inference at 32/64, "
                    "1 thread (2 threads on a shared 2-core box run 100x slower)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of peak memory against R per mode")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="combine earlier --json files, no run")
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly win
        quick = {"configs": "tiny", "resolutions": "32,64", "steps": 2, "warmup": 1, "image": 64, "points": 4000,
                 "inference_resolutions": "32,64", "inference_points": 4000, "names": ",".join(QUICK_MESHES),
                 "inference_names": f"{QUICK_MESHES[0]},{QUICK_MESHES[1]}_x16", "threads": 1}
        for key, value in quick.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    if args.offload and args.block_group < 1:
        ap.error("--offload needs --block-group >= 1 (the runs of blocks whose inputs go to host memory)")
    if args.store_rows and (args.offload or args.block_group > 1):
        ap.error("--store-rows does not combine with --block-group / --offload (their runs recompute)")
    for v in args.checkpointing.split(","):
        if v not in CHECKPOINTING:
            ap.error(f"--checkpointing {v!r}: choose from {', '.join(CHECKPOINTING)}")
    for m in args.modes.split(","):
        if m not in MODES:
            ap.error(f"--modes {m!r}: choose from {', '.join(MODES)}")
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        results = merge(args.merge)
        print_all(results)
        write_json(results, args.json)
        if args.plot:
            plot(results, args.plot)
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        use_torch_compile(min_rows=args.compile_min_rows)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    machine = torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu")
    results = {
        "device": str(device), "machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "gpu_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "weights": f"random: initialised with seed {args.seed}, not trained"
                   + (f"; inference also with the trained {args.checkpoint}" if args.checkpoint else ""),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "meshes": {n: MESHES.get(n, "") for n in args.names.split(",")}, "train": [], "inference": [],
    }
    print(f"# bench_train_step on {device} ({machine}), torch {torch.__version__}, {torch.get_num_threads()} threads;"
          f" {args.image}^2 renders, batch 1, {args.warmup} warm-up + {args.steps} steps; weights random (not trained)"
          + (f", inference also with {args.checkpoint}" if args.checkpoint else ""))
    started = time.monotonic()

    def out_of_time() -> bool:
        return args.max_minutes is not None and time.monotonic() - started > 60 * args.max_minutes

    folders = mesh_folders(args.meshes)
    names = args.names.split(",")

    def run_inferences(model, config_name: str, ckpt: str) -> None:
        """The inference rows of one model: --inference-names x --inference-resolutions."""
        if args.no_inference or not _ints(args.inference_resolutions):
            return
        model.eval()
        inf_names = args.inference_names.split(",") if args.inference_names else names + [BIG_MESH]
        for name in inf_names:
            path = find_mesh(name, folders, Path(workdir))
            for R in _ints(args.inference_resolutions):
                row = {"config": config_name, "checkpointing": ckpt, "mesh": name, "resolution": R}
                if out_of_time():
                    row.update(status="not run", error="--max-minutes reached", input_faces=0)
                else:
                    row.update(run_inference(model, path, R, args.inference_points or DEFAULT_POINTS,
                                             args.tile or None, device))
                results["inference"].append(row)
                print(f"  inference {name} R={R}: {row['status']} {_fmt(row.get('seconds'), '.2f')} s, "
                      f"peak {_fmt(row.get('peak_gib'), '.2f')} GiB", flush=True)
                write_json(results, args.json)
    resolutions = _ints(args.resolutions)
    modes = args.modes.split(",")
    batches: dict = {}
    with tempfile.TemporaryDirectory() as workdir:
        for config_name in [c for c in args.configs.split(",") if c]:
            for ckpt in args.checkpointing.split(","):
                cfg = experiment(config_name, ckpt, args.image, args.pointnet_chunk, args.block_chunk,
                                 args.block_group, args.offload)
                if args.stream_dtype:
                    cfg.model.stream_dtype = args.stream_dtype
                if args.store_rows is not None:
                    cfg.model.store_rows = args.store_rows
                torch.manual_seed(args.seed)
                model = FocusingVAE(cfg.model).to(device).train()
                points = args.points or cfg.data.points
                print(f"\n{config_name} (checkpointing {ckpt}): {count_parameters(model) / 1e6:.1f}M parameters, "
                      f"{points:,} points, zoom N in {cfg.views.zoom_voxels}", flush=True)
                for name in names:
                    path = find_mesh(name, folders, Path(workdir))
                    for R in resolutions:
                        key = (name, R, points)
                        if key not in batches:
                            batches.clear()
                            free_memory(device)
                            batches[key] = build_batch(path, R, points, device, args.seed)
                        batch, build_s = batches[key]
                        for mode in modes:
                            row = {"config": config_name, "checkpointing": ckpt, "mesh": name, "resolution": R,
                                   "mode": mode, "points": points, "batch_build_s": build_s, "compiled": args.compile,
                                   "compile_min_rows": args.compile_min_rows if args.compile else 0,
                                   "stream_dtype": cfg.model.stream_dtype, "store_rows": cfg.model.store_rows}
                            if out_of_time():
                                row.update(status="not run", error="--max-minutes reached")
                            else:
                                selection, zoom = MODES[mode]
                                views = dataclasses.replace(cfg.views, selection=selection, zoom=zoom)
                                objective = VAEObjective(cfg.loss, views)
                                trace = None
                                if args.trace:
                                    trace = args.trace.with_name(f"{args.trace.stem}_{config_name}_{name}_{R}_"
                                                                 f"{mode.replace('+', '_')}{args.trace.suffix}")
                                row.update(run_case(model, objective, batch, device, steps=args.steps,
                                                    warmup=args.warmup, seed=args.seed,
                                                    first_step=cfg.loss.tsdf_steps,
                                                    case_seconds=args.case_seconds,
                                                    profile=args.profile_top if args.profile else 0, trace=trace,
                                                    ops=args.profile_top if args.count_ops else 0))
                            results["train"].append(row)
                            _print_case(row)
                            add_ratios(results["train"])
                            write_json(results, args.json)
                batches.clear()
                run_inferences(model, config_name, ckpt)
                del model
                free_memory(device)
        if args.checkpoint is not None:
            from focusing.inference import load_vae

            model = load_vae(args.checkpoint, device)
            print(f"\n{args.checkpoint.name} (trained weights): {count_parameters(model) / 1e6:.1f}M parameters",
                  flush=True)
            run_inferences(model, f"{args.checkpoint.name} (trained)", "none")
            del model
            free_memory(device)
    add_ratios(results["train"])
    print_all(results)
    write_json(results, args.json)
    if args.plot:
        plot(results, args.plot)
    return results


def _print_case(row: dict) -> None:
    if row["status"] != "ok":
        print(f"  {row['mesh']} R={row['resolution']} {row['mode']}: {row['status'].upper()} "
              f"({row.get('error', '')})", flush=True)
        return
    print(f"  {row['mesh']} R={row['resolution']} {row['mode']}: encoded {row['encoded']:,.0f}, decoded "
          f"{row['decoded']:,.0f}, R voxels {row['full']:,.0f}, {row['triangles']:,.0f} tris, {row['ms']:.0f} ms, "
          f"peak {_fmt(row['peak_gib'], '.2f')} GiB", flush=True)
    for slow in row.get("slow_steps", []):
        phase, ms = max(slow["phases_ms"].items(), key=lambda kv: kv[1] - row["phases_ms"][kv[0]])
        print(f"    slow step {slow['step']}: {slow['ms']:.0f} ms, {phase} {ms:.0f} ms (median "
              f"{row['phases_ms'][phase]:.0f})", flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
