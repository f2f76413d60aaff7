"""Training batches built on the device from raw meshes, in the loop: the trainer's data path (no cache needed).

A sample is built from one normalised mesh: augmentation (random rotation and anisotropic scale, then the
`normalize` rule again, on the CPU in float64), oriented surface sampling on the device
(`sample_surface_torch`) and the exact voxel pyramid on the device (`voxel_pyramid`). A batch (the contract
between this module and the trainer, all tensors on the device, meshes in the same augmented frame as the
points):

    ids            list[str]
    resolution     int R
    points         f32 [P_total, 3]   oriented surface samples of every mesh, mesh after mesh
    normals        f32 [P_total, 3]   their unit face normals
    point_batch    i64 [P_total]      the batch index of each point (non-decreasing)
    voxels_latent  i32 [N0, 4]        (batch, x, y, z) active voxels at R/4, sorted
    voxels_mid     i32 [N1, 4]        at R/2  (not with `latent_only`)
    voxels         i32 [N2, 4]        at R    (not with `latent_only`)
    vertices       list of f32 [V_b, 3]   the GT meshes
    faces          list of i64 [F_b, 3]

`make_source` gives a `TrainingSource` over a packed corpus (`focusing pack`), a folder of mesh files or a
`focusing prepare` cache. Schedule: the sample stream is an endless chain of epochs, epoch e being a
permutation of the meshes seeded by (seed, e); global batch k is the next world_size * batch_size samples of
the stream and rank r takes its r-th block of batch_size, so ranks are disjoint at every step and together
cover each epoch exactly once. Sample g of the stream is built with random numbers seeded by (seed, g) only,
so the batches are a function of (seed, step): `state_dict` is the stream position (plain ints) and
`load_state_dict` resumes exactly, whatever was being built ahead. `reuse` returns each built batch that many
times in a row (the trainer draws a new camera each step), amortising the building.

On CUDA the next batches are built ahead (`prefetch`, default 2) in a background thread on its own CUDA
stream; the trainer's stream waits on an event recorded after building, and every tensor handed over is
`record_stream`-ed so the allocator never reuses its memory while the trainer still reads it.
"""

from __future__ import annotations

import collections
import math
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from focusing.data.dataset import LEVEL_KEYS
from focusing.data.voxelize import voxel_pyramid, voxelize, with_batch
from focusing.errors import FocusingError, InputError, failure_message
from focusing.io.mesh import Mesh, normalize

STATE_VERSION = 1
FIXED_TARGETS = 64
"""Meshes whose fixed-pose corner TSDF an `OnlineSource` keeps (see `OnlineSource._fixed_targets`)."""
FIXED_SAMPLE_BYTES = 2**30
"""Bytes of built samples an `OnlineSource` keeps when they depend on the mesh alone (`OnlineSource._fixed_sample`)."""


def sample_surface_torch(
    vertices: torch.Tensor, faces: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`focusing.data.sampling.sample_surface` on the device: `n` points uniformly by area.

    vertices: [V, 3] float (the maths runs in its dtype; float64 like the numpy sampler), faces: [F, 3] int64,
    generator: on the vertices' device. Returns points f32 [n, 3], unit face normals f32 [n, 3], face index
    i64 [n]. Same maths: the face by inverting the area CDF, barycentrics by the square-root warp.
    """
    tri = vertices[faces]
    cross = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    double_area = cross.norm(dim=1)
    cdf = double_area.cumsum(0)
    options = dict(generator=generator, device=vertices.device, dtype=vertices.dtype)
    face = torch.searchsorted(cdf, torch.rand(n, **options) * cdf[-1], right=True).clamp_(max=len(cdf) - 1)
    r1 = torch.rand(n, **options).sqrt_()
    r2 = torch.rand(n, **options)
    t = tri[face]
    w1, w2 = r1 * (1.0 - r2), r1 * r2
    points = (1.0 - r1)[:, None] * t[:, 0] + w1[:, None] * t[:, 1] + w2[:, None] * t[:, 2]
    normals = cross[face] / double_area[face, None]
    return points.float(), normals.float(), face


@dataclass(frozen=True)
class AugmentConfig:
    """Random pose and proportions of a training mesh.

    rotation: "so3" (uniform over all rotations), "up" (uniform about axis `up_axis`, then a tilt of at most
    `tilt_deg` about a random horizontal axis) or "none". scale: range of the per-axis scale factors (drawn
    log-uniformly, independently per axis, applied in the mesh's own axes before the rotation). An isotropic
    scale would be undone by re-normalising, so the object size is `extent` instead: the longest side after
    re-normalising, drawn uniformly (default exactly 1, the `normalize` rule).
    """

    rotation: str = "so3"
    up_axis: int = 1
    tilt_deg: float = 10.0
    scale: tuple[float, float] = (0.75, 1.25)
    extent: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self):
        if self.rotation not in ("so3", "up", "none"):
            raise ValueError(f"rotation must be so3, up or none, got {self.rotation!r}")
        if not (0 < self.scale[0] <= self.scale[1]) or not (0 < self.extent[0] <= self.extent[1] <= 1):
            raise ValueError(f"need 0 < scale lo <= hi and 0 < extent lo <= hi <= 1, got {self.scale}, {self.extent}")


def _axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    """[3, 3] rotation by `angle` about unit `axis` (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def random_rotation(config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """[3, 3] float64 rotation drawn as `config.rotation` says."""
    if config.rotation == "none":
        return np.eye(3)
    if config.rotation == "so3":  # a uniform unit quaternion (w, x, y, z) gives a uniform rotation
        q = rng.standard_normal(4)
        w, x, y, z = q / np.linalg.norm(q)
        return np.array([
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ])
    up = np.eye(3)[config.up_axis]
    yaw = _axis_angle(up, rng.uniform(0, 2 * math.pi))
    a, b = np.eye(3)[[i for i in range(3) if i != config.up_axis]]
    phi = rng.uniform(0, 2 * math.pi)
    tilt = _axis_angle(math.cos(phi) * a + math.sin(phi) * b, math.radians(rng.uniform(0, config.tilt_deg)))
    return tilt @ yaw


def augment_mesh(mesh: Mesh, config: AugmentConfig, rng: np.random.Generator) -> Mesh:
    """A randomly rotated and stretched copy of `mesh`, normalised again (`normalize`), then scaled so its
    longest side is a random `config.extent`: it stays inside [-0.5, 0.5]^3."""
    stretch = np.exp(rng.uniform(math.log(config.scale[0]), math.log(config.scale[1]), 3))
    linear = random_rotation(config, rng) * stretch  # R @ diag(stretch)
    out, _ = normalize(mesh.transformed(lambda v: v @ linear.T))
    extent = rng.uniform(*config.extent)
    return out if extent == 1.0 else out.transformed(lambda v: v * extent)


def _seeds(key: tuple[int, ...]) -> tuple[np.random.Generator, int]:
    """A numpy generator (augmentation) and a torch seed (sampling), both derived from `key` alone."""
    sequence = np.random.SeedSequence(list(key))
    numpy_seq, torch_seq = sequence.spawn(2)
    return np.random.default_rng(numpy_seq), int(torch_seq.generate_state(1, np.uint64)[0] >> 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def build_sample(
    mesh: Mesh, *, resolution: int, points: int, device: torch.device, augment: AugmentConfig | None, key,
    tsdf_truncation: float | None = None, latent_only: bool = False,
) -> dict:
    """One sample from a normalised mesh: augmented (if `augment`), `points` surface samples and the voxel
    pyramid at R/4, R/2, R ([N, 3] int32, sorted), all on `device`; random numbers seeded by `key` (ints).
    tsdf_truncation: also the corners [M, 3] of the R-level voxels and their corner TSDF [M] (normalised units,
    `focusing.data.tsdf.corner_tsdf` truncated at that many voxels), the target of the TSDF warm-up.
    latent_only: the voxels at R/4 alone (`voxels_latent`, exact voxelisation there: the same set as the
    pyramid's), for models that never look finer (the generator's); ~8x cheaper at R = 256. Not with
    tsdf_truncation (the TSDF lives on the R-level voxels)."""
    rng, torch_seed = _seeds(key)
    if augment is not None:
        mesh = augment_mesh(mesh, augment, rng)
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float64, device=device)
    faces = torch.as_tensor(mesh.faces, dtype=torch.int64, device=device)
    pts, normals, _ = sample_surface_torch(vertices, faces, points, _generator(device, torch_seed))
    if latent_only:
        levels = [voxelize(mesh, resolution // 4, device=device)]
    else:
        pyramid = voxel_pyramid(mesh, resolution, device=device)
        levels = [pyramid[resolution // 4], pyramid[resolution // 2], pyramid[resolution]]
    sample = {"points": pts, "normals": normals, **dict(zip(LEVEL_KEYS, levels)),
              "vertices": vertices.float(), "faces": faces}
    if tsdf_truncation is not None:
        sample.update(corner_targets(mesh, levels[2], resolution, tsdf_truncation))
    return sample


def corner_targets(mesh: Mesh, voxels: torch.Tensor, resolution: int, truncation_voxels: float) -> dict:
    """{"corners": [M, 3] int32 corners of `voxels` [N, 3] (sorted), "tsdf": [M] float32} on voxels' device."""
    from focusing.data.grid import voxel_corners
    from focusing.data.tsdf import corner_tsdf

    corners = voxel_corners(with_batch(voxels))[0][:, 1:]
    return {"corners": corners, "tsdf": corner_tsdf(mesh, corners, resolution, truncation_voxels,
                                                    device=voxels.device)}


def collate(samples: list[dict], ids: list[str], resolution: int) -> dict:
    """Samples (as `build_sample` returns them) -> the batch dict of the module docstring."""
    device = samples[0]["points"].device
    counts = torch.tensor([len(s["points"]) for s in samples], device=device)
    return {
        "ids": list(ids),
        "resolution": resolution,
        "points": torch.cat([s["points"] for s in samples]),
        "normals": torch.cat([s["normals"] for s in samples]),
        "point_batch": torch.repeat_interleave(torch.arange(len(samples), device=device), counts),
        **{k: torch.cat([with_batch(s[k], b) for b, s in enumerate(samples)])
           for k in LEVEL_KEYS if k in samples[0]},
        "vertices": [s["vertices"] for s in samples],
        "faces": [s["faces"] for s in samples],
        **({"corners": torch.cat([with_batch(s["corners"], b) for b, s in enumerate(samples)]),
            "tsdf": torch.cat([s["tsdf"] for s in samples])} if "tsdf" in samples[0] else {}),
    }


class MeshCollection(Protocol):
    """What a source draws meshes from: `ids`, and per mesh its file `names` and `sha256` (for the held-out
    test; None where unknown), and `mesh(i)`: the normalised Mesh (raises InputError when unusable)."""

    ids: list[str]
    names: list[str]
    sha256: list[str | None]

    def __len__(self) -> int: ...

    def mesh(self, i: int) -> Mesh: ...


class PackedMeshes:
    """A packed corpus (`focusing.data.corpus.PackedCorpus`) as a MeshCollection."""

    def __init__(self, path):
        from focusing.data.corpus import PackedCorpus

        self.corpus = PackedCorpus(path)
        self.ids, self.names, self.sha256 = self.corpus.ids, self.corpus.keys, self.corpus.sha256

    def __len__(self) -> int:
        return len(self.corpus)

    def mesh(self, i: int) -> Mesh:
        return self.corpus.mesh(i)


class MeshFolder:
    """Mesh files (files, or folders searched recursively, as `focusing prepare` finds them), loaded and
    normalised on demand."""

    def __init__(self, inputs):
        from focusing.data.prepare import file_sha256, find_items

        items = find_items(list(inputs))
        self.paths = [i.path for i in items]
        self.ids, self.names = [i.id for i in items], [i.key for i in items]
        self.sha256 = [file_sha256(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def mesh(self, i: int) -> Mesh:
        from focusing.io.mesh import load_mesh

        return normalize(load_mesh(self.paths[i]), self.paths[i])[0]


class CacheMeshes:
    """A `focusing prepare` cache (`ShapeDataset`) as a MeshCollection; `stored` gives an item's own points
    and voxels (the cache's fixed pose and resolution) in `build_sample`'s form."""

    def __init__(self, cache_dir):
        from focusing.data.dataset import ShapeDataset

        self.dataset = ShapeDataset(cache_dir)
        if not len(self.dataset):
            raise InputError(cache_dir, "cache holds no prepared item")
        self.resolution = self.dataset.resolution
        entries = self.dataset.entries
        self.ids = [e["id"] for e in entries]
        self.names = [e.get("key") or e.get("source", e["id"]) for e in entries]
        self.sha256 = [e.get("sha256") for e in entries]

    def __len__(self) -> int:
        return len(self.dataset)

    def mesh(self, i: int) -> Mesh:
        item = self.dataset[i]
        return Mesh(item["vertices"].numpy(), item["faces"].numpy())

    def stored(self, i: int, points: int, device: torch.device, key) -> dict:
        """The cached sample: `points` of its surface samples drawn without replacement (all if it has fewer)."""
        item = self.dataset[i]
        _, torch_seed = _seeds(key)
        pick = torch.randperm(len(item["points"]), generator=_generator(torch.device("cpu"), torch_seed))[:points]
        sample = {k: item[k][pick].to(device) for k in ("points", "normals")}
        sample.update({k: item[k].to(device) for k in (*LEVEL_KEYS, "faces")})
        sample["vertices"] = item["vertices"].to(device, torch.float32)
        return sample


class TrainingSource(Protocol):
    """The trainer's view of its data (see the module docstring for the batch dict and the schedule)."""

    ids: list[str]

    def next_batch(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


class OnlineSource:
    """A TrainingSource that builds batches from a MeshCollection (see the module docstring).

    Meshes held out by `exclude` (`focusing.data.holdout.HeldOut`) are left out: by name and sha256 when the
    source is opened, by geometry when a mesh is built. A mesh that fails to build (unreadable, held out by
    geometry) is logged once and replaced, deterministically, by the next usable mesh of the epoch's order.
    """

    def __init__(self, collection: MeshCollection, *, resolution: int, points: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device="cpu", augment: AugmentConfig | None = None,
                 reuse: int = 1, exclude=(), prefetch: int | None = None, tsdf_truncation: float | None = None,
                 latent_only: bool = False):
        from focusing.data.holdout import HeldOut

        if resolution < 4 or resolution % 4:
            raise FocusingError(f"resolution must be a positive multiple of 4, got {resolution}")
        if points < 0 or min(batch_size, reuse, world_size) < 1 or not 0 <= rank < world_size:
            raise FocusingError(f"need points >= 0, batch size, reuse >= 1 and 0 <= rank < world size, got {points}, "
                                f"{batch_size}, {reuse}, rank {rank} of {world_size}")
        self.collection = collection
        self.resolution, self.points, self.batch_size, self.reuse = resolution, points, batch_size, reuse
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.augment = augment
        self.tsdf_truncation = tsdf_truncation
        if latent_only and tsdf_truncation is not None:
            raise FocusingError("the corner TSDF needs the R-level voxels: latent_only excludes tsdf_truncation")
        self.latent_only = latent_only
        self._targets: collections.OrderedDict[int, dict] = collections.OrderedDict()
        # no augmentation, no points: a sample is a function of its mesh alone (exact voxels), so it is kept
        self.fixed_samples = augment is None and points == 0 and tsdf_truncation is None
        self._samples: collections.OrderedDict[int, tuple[dict, int]] = collections.OrderedDict()
        self._samples_lock = threading.Lock()
        self.held = exclude if isinstance(exclude, HeldOut) else HeldOut.from_paths(exclude)
        self.usable = []
        for i in range(len(collection)):
            reason = self.held.reason(collection.names[i], collection.sha256[i]) if self.held else None
            if reason:
                print(f"focusing data: left out {collection.names[i]}: {reason}", file=sys.stderr)
            else:
                self.usable.append(i)
        if not self.usable:
            raise FocusingError("no training mesh left after excluding the held-out ones")
        self.ids = [collection.ids[i] for i in self.usable]
        cached = isinstance(collection, CacheMeshes)
        self.use_stored = cached and augment is None and collection.resolution == resolution
        self.prefetch = (2 if self.device.type == "cuda" else 0) if prefetch is None else prefetch
        self._bad: set[int] = set()
        self._perms: dict[int, torch.Tensor] = {}
        self._next = 0  # stream position of the next built batch to fetch
        self._current: dict | None = None  # the built batch being reused, from stream position _current_start
        self._current_start, self._uses = 0, 0
        self._worker: _Prefetcher | None = None

    def __len__(self) -> int:
        return len(self.usable)

    # -- schedule ---------------------------------------------------------------------------------------
    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(len(self.usable), generator=g)
        return self._perms[epoch]

    def positions(self, start: int) -> list[int]:
        """Global stream positions of this rank's samples in the global batch starting at `start`."""
        first = start + self.rank * self.batch_size
        return list(range(first, first + self.batch_size))

    def _mesh_at(self, g: int) -> tuple[int, Mesh]:
        """(collection index, normalised mesh) of stream position g; unusable meshes give way to the next."""
        n = len(self.usable)
        perm = self._perm(g // n)
        for step in range(n):
            index = self.usable[int(perm[(g % n + step) % n])]
            if index in self._bad:
                continue
            try:
                mesh = None if self.use_stored or self._kept(index) is not None else self.collection.mesh(index)
                reason = self.held.reason(mesh=mesh) if mesh is not None and self.held.shapes else None
                if reason is None:
                    return index, mesh
            except Exception as exc:  # noqa: BLE001  (log the mesh and go on with the next one)
                reason = failure_message(exc)
            self._bad.add(index)
            print(f"focusing data: skipped {self.collection.names[index]}: {reason}", file=sys.stderr)
        raise FocusingError("no training mesh could be built")

    def build(self, start: int) -> dict:
        """This rank's batch of the global batch starting at stream position `start` (a pure function)."""
        samples, ids = [], []
        for g in self.positions(start):
            index, mesh = self._mesh_at(g)
            key = (self.seed, g)
            if self.use_stored:
                sample = self.collection.stored(index, self.points, self.device, key)
            elif self.fixed_samples:
                sample = self._fixed_sample(index, mesh, key)
            else:  # an augmented mesh gets its own corner TSDF; a fixed pose's comes from `_fixed_targets`
                sample = build_sample(mesh, resolution=self.resolution, points=self.points, device=self.device,
                                      augment=self.augment, key=key, latent_only=self.latent_only,
                                      tsdf_truncation=self.tsdf_truncation if self.augment is not None else None)
            if self.tsdf_truncation is not None and "tsdf" not in sample:
                sample.update(self._fixed_targets(index, mesh, sample["voxels"]))
            samples.append(sample)
            ids.append(self.collection.ids[index])
        return collate(samples, ids, self.resolution)

    def _kept(self, index: int) -> dict | None:
        """The kept sample of mesh `index` (`fixed_samples`), or None."""
        with self._samples_lock:
            if index not in self._samples:
                return None
            self._samples.move_to_end(index)
            return self._samples[index][0]

    def _fixed_sample(self, index: int, mesh: Mesh | None, key) -> dict:
        """The sample of mesh `index` when it depends on the mesh alone (`fixed_samples`: the generators' latent
        voxels): built once and kept, up to FIXED_SAMPLE_BYTES (least recently used first out). Batches do not
        change; the exact voxelisation of each mesh (on the host) then runs once instead of at every draw."""
        sample = self._kept(index)
        if sample is not None:
            return sample
        mesh = self.collection.mesh(index) if mesh is None else mesh  # let go since `_mesh_at` found it kept
        sample = build_sample(mesh, resolution=self.resolution, points=0, device=self.device, augment=None, key=key,
                              latent_only=self.latent_only)
        size = sum(t.numel() * t.element_size() for t in sample.values())
        with self._samples_lock:
            self._samples[index] = (sample, size)
            while sum(n for _, n in self._samples.values()) > FIXED_SAMPLE_BYTES and len(self._samples) > 1:
                self._samples.popitem(last=False)
        return sample

    def _fixed_targets(self, index: int, mesh: Mesh, voxels: torch.Tensor) -> dict:
        """Corner TSDF of mesh `index` in its fixed pose (no augmentation): the same at every use, so the last
        FIXED_TARGETS meshes' are kept (the TSDF is the costly part of a sample; overfitting one mesh pays once)."""
        if index in self._targets:
            self._targets.move_to_end(index)
        else:
            self._targets[index] = corner_targets(mesh, voxels, self.resolution, self.tsdf_truncation)
            while len(self._targets) > FIXED_TARGETS:
                self._targets.popitem(last=False)
        return self._targets[index]

    # -- the TrainingSource protocol --------------------------------------------------------------------
    @property
    def stride(self) -> int:
        """Samples per global batch (all ranks)."""
        return self.world_size * self.batch_size

    def next_batch(self) -> dict:
        if self._current is None or self._uses >= self.reuse:
            self._current, self._current_start, self._uses = self._fetch(self._next), self._next, 0
            self._next += self.stride
        self._uses += 1
        return self._current

    def _fetch(self, start: int) -> dict:
        if self.prefetch <= 0:
            return self.build(start)
        if self._worker is None:
            self._worker = _Prefetcher(self, start)
        return self._worker.take(start)

    def state_dict(self) -> dict:
        """JSON-able ints: the next batch returned is the built batch at stream `position`, already returned
        `uses` times. Identical on every rank, so rank 0's state resumes them all."""
        if self._current is not None and self._uses < self.reuse:
            position, uses = self._current_start, self._uses
        else:
            position, uses = self._next, 0
        n = len(self.usable)
        return {"version": STATE_VERSION, "seed": self.seed, "size": n, "position": position, "uses": uses,
                "epoch": position // n, "sample": position % n}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken: the same batches follow as in an unbroken run (with the
        same batch size, world size and reuse; after a change of them the stream goes on from that position)."""
        if state.get("version") != STATE_VERSION:
            raise FocusingError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        if (state["seed"], state["size"]) != (self.seed, len(self.usable)):
            raise FocusingError(f"data state is for seed {state['seed']} and {state['size']} meshes, this source "
                                f"has seed {self.seed} and {len(self.usable)} meshes")
        self.close()
        self._current, self._next = None, int(state["position"])
        if 0 < state["uses"] < self.reuse:  # rebuild the current batch for its remaining uses
            self.next_batch()
            self._uses = int(state["uses"])

    def close(self) -> None:
        """Stop building ahead (a later `next_batch` starts again)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


class _Prefetcher:
    """Builds a source's batches at start, start + stride, ... in a background thread (on its own CUDA stream
    when the device is CUDA), at most `source.prefetch` ahead."""

    def __init__(self, source: OnlineSource, start: int):
        self.source = source
        self.queue: queue.Queue = queue.Queue(maxsize=source.prefetch)
        self.halt = threading.Event()
        cuda = source.device.type == "cuda"
        self.stream = torch.cuda.Stream(source.device) if cuda else None
        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True, name="focusing-data")
        self.thread.start()

    def _run(self, start: int) -> None:
        import contextlib

        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            while not self.halt.is_set():
                try:
                    batch, event = self.source.build(start), None
                    if self.stream is not None:
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    item = (start, batch, event, None)
                except BaseException as exc:  # noqa: BLE001  (handed to the trainer's thread, raised there)
                    item = (start, None, None, exc)
                while not self.halt.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[3] is not None:
                    return
                start += self.source.stride

    def take(self, start: int) -> dict:
        got, batch, event, error = self.queue.get()
        if error is not None:
            raise error
        if got != start:
            raise RuntimeError(f"prefetcher out of order: built {got}, asked for {start}")
        if event is not None:  # the trainer's stream waits for the build; its memory is not reused before use
            consumer = torch.cuda.current_stream(self.source.device)
            consumer.wait_event(event)
            for t in _tensors(batch):
                t.record_stream(consumer)
        return batch

    def stop(self) -> None:
        self.halt.set()
        self.thread.join()


def _tensors(batch: dict):
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def make_source(spec, *, resolution: int, points: int, batch_size: int, rank: int = 0, world_size: int = 1,
                seed: int = 0, device="cpu", augment: AugmentConfig | None = None, reuse: int = 1, exclude=(),
                prefetch: int | None = None, tsdf_truncation: float | None = None,
                latent_only: bool = False) -> OnlineSource:
    """A TrainingSource for `spec`: a packed corpus file (`focusing pack`), a `focusing prepare` cache folder
    (its stored points and voxels when augment is None and R is the cache's, else built from its meshes), or
    a mesh file / folder of mesh files. `exclude`: held-out MANIFEST.tsv files, folders or meshes
    (`focusing.data.holdout`). `prefetch`: batches built ahead in a background thread (default 2 on CUDA,
    0 = build in `next_batch`, the default on the CPU). `tsdf_truncation`: batches also carry the corner TSDF
    of the R-level voxels (`corners` [M, 4], `tsdf` [M]) for the warm-up. `latent_only`: batches without the
    voxels at R/2 and R (`build_sample`). `points` 0: no surface samples, for models that read only voxels."""
    from focusing.data.corpus import is_packed_corpus

    path = Path(spec)
    if path.is_file() and is_packed_corpus(path):
        collection = PackedMeshes(path)
    elif path.is_dir() and (any(path.glob("index-*-of-*.json")) or (path / "items").is_dir()):
        collection = CacheMeshes(path)
    elif path.exists():
        collection = MeshFolder([path])
    else:
        raise InputError(path, "no such corpus, cache, mesh file or folder")
    return OnlineSource(collection, resolution=resolution, points=points, batch_size=batch_size, rank=rank,
                        world_size=world_size, seed=seed, device=device, augment=augment, reuse=reuse,
                        exclude=exclude, prefetch=prefetch, tsdf_truncation=tsdf_truncation, latent_only=latent_only)
