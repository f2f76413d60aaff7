"""Reconstruction methods that `focusing benchmark` compares: the VAE's baselines, one class per method.

A method is registered under a name in `METHODS` and constructed with its options (dataclass fields, given on the
command line as `--option key=value` and converted to the field's type by `make_method`):

    method = make_method("poisson", {"trim": "1.0"})
    pred = method.reconstruct(gt, resolution, seed=0)   # gt and pred in the normalised frame [-0.5, 0.5]^3

`reconstruct` gets the ground truth normalised into [-0.5, 0.5]^3 and returns a `Mesh` in the same frame; a method
that can only use part of the GT (e.g. an encoder that sees oriented points) takes just that part. Options listed in
a class's `RUNTIME_OPTIONS` (e.g. `device`) do not change the result and are left out of `method_identity`, which
decides whether a benchmark result can be reused. The VAE plugs in the same way, as `vae` with a `checkpoint` option
(`--checkpoint PATH` on the command line). Construction must stay cheap (the benchmark builds a method to check its
options); a model loads on the first `reconstruct` (the benchmark keeps one instance per worker process).

Methods:
- `gt-resample`: the GT itself. The metric samples prediction and GT with different seeds, so this measures the
  metric's own floor (a perfect reconstruction scores this, not CD 0 / F 1).
- `poisson`: screened Poisson reconstruction (Kazhdan & Hoppe 2013, through pymeshlab) of the oriented point cloud
  the VAE's encoder gets (`sample_surface`: 819,200 area-weighted points with their face normals), octree depth
  ceil(log2 R), then density trimming (see `Poisson`).
- `sdf-mc`: the SDF route, flood fill + marching cubes at R (`focusing.eval.watertight.watertight_remesh`).
- `fit`: a SparseFlex field fitted to the GT's renders at R (`focusing.sparseflex.fit.fit_mesh`): what the VAE's
  decoder can express at best. Slow on CPU.
- `vae`: the Focusing VAE (`focusing.inference.reconstruct_mesh`): `points` oriented samples of the GT encoded on
  the exact latent voxels at R/4, decoded at R; `checkpoint` is a folder (default: the shipped one).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

import numpy as np

from focusing.data.sampling import DEFAULT_POINTS
from focusing.device import resolve_device
from focusing.errors import FocusingError
from focusing.inference import KEEP_LOGIT
from focusing.io.mesh import Mesh

METHODS: dict[str, type] = {}


def register(name: str):
    """Class decorator: add a method (a dataclass with `reconstruct`) to `METHODS` under `name`."""

    def add(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def _convert(text: str, hint, key: str):
    """`text` as the type `hint` (int, float, str, bool, or one of them | None, where "none" means None)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if text.strip().lower() == "none":
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if text.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if text.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise FocusingError(f"option {key}: expected true or false, got {text!r}")
    try:
        return hint(text)
    except ValueError:
        raise FocusingError(f"option {key}: expected {hint.__name__}, got {text!r}") from None


def make_method(name: str, options: dict[str, str] | None = None):
    """The method `name` constructed with `options` (strings, converted to each field's type)."""
    if name not in METHODS:
        raise FocusingError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    cls = METHODS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, text in (options or {}).items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise FocusingError(f"method {name} has no option {key!r} (its options: {known})")
        values[key] = _convert(text, hints[key], key)
    return cls(**values)


def method_identity(method) -> dict:
    """Name and result-changing options of a method instance (what a reusable result must match)."""
    runtime = getattr(method, "RUNTIME_OPTIONS", ())
    options = {k: v for k, v in dataclasses.asdict(method).items() if k not in runtime}
    return {"method": method.name, "options": options}


@register("gt-resample")
@dataclass
class GtResample:
    """The ground truth itself: the metric's floor (see the module docstring)."""

    def reconstruct(self, gt: Mesh, resolution: int, *, seed: int = 0) -> Mesh:
        return gt


@register("poisson")
@dataclass
class Poisson:
    """Screened Poisson reconstruction of `points` oriented surface samples of the GT (seeded by `seed`).

    pymeshlab's `generate_surface_reconstruction_screened_poisson` with depth = ceil(log2 R) (the finest octree
    cells are `scale` / 2^depth of the samples' bounding cube: ~1.1 / R) and pymeshlab's defaults otherwise:
    `samplespernode` 1.5, `pointweight` 4 (screening), 8 Gauss-Seidel iterations, no pre-cleaning. The result is
    watertight: it closes open surfaces and holes, extrapolating where there are no samples.

    Trimming (what users do for open surfaces, like PoissonRecon's SurfaceTrimmer): every output vertex carries
    Poisson's sampling-density estimate (an octree depth, lower where samples are sparse); vertices more than `trim`
    below the median density are removed with their faces. Uniform samples give the real surface a narrow band of
    densities (within 0.4 of the median on fandisk and steel_ladder, where Poisson invents nothing), while the surface
    it invents across open boundaries falls up to 6 below it; `trim` = 1 removes that and nothing of a closed mesh
    (see docs/BENCHMARKS.md). `trim=none` keeps the watertight result.

    `threads` defaults to 1: parallelise over meshes with the benchmark's workers instead. PoissonRecon's OpenMP
    loops synchronise often, and on a shared CPU 2 threads ran 7x slower than 1 (bunny, depth 8, 2 busy cores).
    """

    points: int = DEFAULT_POINTS
    trim: float | None = 1.0
    samples_per_node: float = 1.5
    point_weight: float = 4.0
    scale: float = 1.1
    threads: int = 1  # OpenMP threads of PoissonRecon; see the class docstring

    RUNTIME_OPTIONS = ("threads",)

    def reconstruct(self, gt: Mesh, resolution: int, *, seed: int = 0) -> Mesh:
        from focusing.data.sampling import sample_surface
        from focusing.io.mesh import clean

        try:
            import pymeshlab
        except ImportError:
            raise FocusingError("the poisson baseline needs pymeshlab: pip install pymeshlab") from None

        samples = sample_surface(gt, self.points, seed=seed)
        meshes = pymeshlab.MeshSet()
        meshes.add_mesh(pymeshlab.Mesh(vertex_matrix=samples.points.astype(np.float64),
                                       v_normals_matrix=samples.normals.astype(np.float64)))
        meshes.generate_surface_reconstruction_screened_poisson(
            depth=math.ceil(math.log2(resolution)), scale=self.scale, samplespernode=self.samples_per_node,
            pointweight=self.point_weight, iters=8, preclean=False,
            threads=self.threads,
        )
        out = meshes.current_mesh()
        vertices, faces = out.vertex_matrix(), out.face_matrix()
        if self.trim is not None:
            density = out.vertex_scalar_array()
            keep = density >= np.median(density) - self.trim
            faces = faces[keep[faces].all(axis=1)]
        if len(faces) == 0:
            raise FocusingError("poisson: empty reconstruction")
        return clean(Mesh(vertices, faces), "poisson")


@register("sdf-mc")
@dataclass
class SdfMc:
    """Flood fill + marching cubes at R: the watertight SDF route (`watertight_remesh`)."""

    device: str = "auto"

    RUNTIME_OPTIONS = ("device",)

    def reconstruct(self, gt: Mesh, resolution: int, *, seed: int = 0) -> Mesh:
        from focusing.eval.watertight import watertight_remesh

        return watertight_remesh(gt, resolution, device=resolve_device(self.device))


@register("fit")
@dataclass
class Fit:
    """A SparseFlex field fitted by render loss at R (`fit_mesh`); options left at None take the defaults of
    `FitConfig.for_device`."""

    steps: int | None = None
    image_size: int | None = None
    view_pool: int | None = None
    views_per_step: int | None = None
    device: str = "auto"

    RUNTIME_OPTIONS = ("device",)

    def reconstruct(self, gt: Mesh, resolution: int, *, seed: int = 0) -> Mesh:
        from focusing.sparseflex.fit import FitConfig, fit_mesh

        config = FitConfig.for_device(self.device, resolution)
        for key in ("steps", "image_size", "view_pool", "views_per_step"):
            if getattr(self, key) is not None:
                setattr(config, key, getattr(self, key))
        return fit_mesh(gt, resolution, device=resolve_device(self.device), seed=seed, config=config)


@register("vae")
@dataclass
class VAE:
    """The VAE's reconstruction at R from `points` oriented GT samples (see the module docstring)."""

    checkpoint: str | None = None
    points: int = DEFAULT_POINTS
    tile: int = 64
    keep_logit: float = KEEP_LOGIT
    close_holes: bool = True
    device: str = "auto"

    RUNTIME_OPTIONS = ("device", "tile")

    def reconstruct(self, gt: Mesh, resolution: int, *, seed: int = 0) -> Mesh:
        from focusing.inference import load_vae, reconstruct_mesh

        if getattr(self, "_model", None) is None:
            self._model = load_vae(self.checkpoint, device=resolve_device(self.device))
        return reconstruct_mesh(self._model, gt, resolution, points=self.points, seed=seed, tile=self.tile or None,
                                keep_logit=self.keep_logit, close_holes=self.close_holes, normalized=True)
