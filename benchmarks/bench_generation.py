"""The image-to-3D demonstration (issue 12): condition on a render of a mesh, generate, score against the mesh.

For each mesh of --train (meshes the generator was trained on) and --heldout (never trained on): render one
condition view (the training condition: a shaded normal map from a random camera, seeded per mesh), generate
with `focusing.image_to_3d.generate`, and measure F@0.005 / Chamfer of the generated mesh against the mesh in
the normalised frame (`focusing.eval.metrics.surface_metrics`, the generated mesh is in that frame). Prints a
table, writes OUT/generation.json and OUT/grid-train.png, OUT/grid-heldout.png (condition image | generated
mesh rendered from the same camera). Target (issue 12): F >= 0.8 on every training mesh.
Unless --no-stages, each mesh also says where the shape is lost, stage by stage (`stage_scores`): the
structure's IoU against the mesh's own latent voxels, the structure VAE's reconstruction IoU of those voxels, F
of the latent flow sampled on the true structure, and F of the shape VAE's own reconstruction (the ceiling);
how much each flow uses its condition (`condition_gain`: 1 - its loss with the view / its loss without); and
which of the --train-count training structures the generated one is nearest (`nearest_structure`: a generator
that memorised its training shapes but misreads the view gives back another training mesh), with the count of
training meshes given back as themselves ("identified").
--identify-only runs the structure flow alone on more views (`identify`: several views of each training mesh,
each generated structure against all training structures), much cheaper than the whole chain.
With --max-minutes no mesh is started that might not finish inside the budget (the longest mesh so far, times
1.5); the meshes left are counted as not run, and the JSON is written after each set.

    python benchmarks/bench_generation.py --checkpoint checkpoints/gen --train .devdata/gen32.safetensors \
        --train-count 32 --heldout .devdata/heldout8.safetensors --heldout-count 8 --out $OUT/gen
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from focusing.sparse.tensor import SparseTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _collection(spec: str):
    from focusing.data.corpus import is_packed_corpus
    from focusing.data.online import MeshFolder, PackedMeshes

    path = Path(spec)
    return PackedMeshes(path) if path.is_file() and is_packed_corpus(path) else MeshFolder([path])


class Budget:
    """Wall-clock budget of the benchmark (None: unlimited): `allows()` is False once the time left is less than
    1.5 x the longest mesh so far (plus 2 s)."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
        self.longest = 0.0

    def allows(self) -> bool:
        return self.deadline is None or self.deadline - time.monotonic() > 1.5 * self.longest + 2.0

    def took(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def condition_view(mesh, cfg, seed: int) -> tuple[torch.Tensor, object]:
    """(the condition image `[3, H, W]` of `mesh` from the random camera seeded `seed`, that camera)."""
    from focusing.train.generation import condition_cameras, render_condition

    cam = condition_cameras(1, cfg, torch.Generator().manual_seed(seed))[0]
    image = render_condition(torch.as_tensor(mesh.vertices, dtype=torch.float32),
                             torch.as_tensor(mesh.faces, dtype=torch.int64), cam)
    return image, cam


def true_latent(gen, mesh, seed: int) -> SparseTensor:
    """The shape VAE's latent `[N, C]` of a normalised mesh on its voxels at the structure grid, in the frame the
    generator trains in (the plain normalisation, not `encode_mesh`'s default off-grid one)."""
    from focusing.inference import encode_mesh
    from focusing.io.mesh import Normalization

    grid = gen.structure_vae.config.resolution
    return encode_mesh(gen.shape_vae, mesh, 4 * grid, seed=seed, frame=Normalization.of(mesh)).z


def training_structures(gen, spec: str, count: int, seed: int) -> list[tuple[str, SparseTensor]]:
    """(name, `true_latent`) of the first `count` meshes of `spec`: what the generator was trained to give back."""
    collection = _collection(spec)
    return [(collection.names[i], true_latent(gen, collection.mesh(i), seed))
            for i in range(min(count, len(collection)))]


def nearest_structure(coords: torch.Tensor, references: list[tuple[str, SparseTensor]], grid: int) -> dict:
    """The reference whose voxels best match `coords` `[N, 4]`: {"nearest_mesh", "nearest_iou"}. A generator
    that memorised its training shapes but misreads the view gives back another training mesh: high
    nearest_iou, wrong nearest_mesh."""
    ious = [_iou(coords, ref.coords, grid) for _, ref in references]
    best = max(range(len(ious)), key=ious.__getitem__)
    return {"nearest_mesh": references[best][0], "nearest_iou": ious[best]}


def run_set(gen, spec: str, count: int, args, sampler, label: str, budget: Budget,
            references: list | None = None) -> tuple[list[dict], dict, int]:
    """Rows and grid images of the first `count` meshes of `spec`, and how many were not run (budget); with
    `references` (`training_structures`), each row also names the training structure nearest to its own."""
    from focusing.eval.metrics import surface_metrics
    from focusing.image_to_3d import decode, sample_latent
    from focusing.train.generation import ConditionConfig, render_condition

    collection = _collection(spec)
    cfg = ConditionConfig(image_size=args.image_size)
    rows, images = [], {}
    known = dict(references or [])  # a training mesh's latent, encoded once for both uses
    wanted = min(count, len(collection))
    for i in range(wanted):
        if not budget.allows():
            print(f"{label:8s} --max-minutes reached: {wanted - i} of {wanted} meshes not run")
            return rows, images, wanted - i
        mesh = collection.mesh(i)
        image, cam = condition_view(mesh, cfg, 1000 + i)
        t0 = time.perf_counter()
        try:
            z = sample_latent(gen, image, seed=args.seed, structure_sampler=sampler, latent_sampler=sampler)
            out = decode(gen, z)
            m = surface_metrics(out, mesh, normalize=False)
            row = {"set": label, "mesh": collection.names[i], "fscore": m.fscore, "chamfer": m.chamfer,
                   "faces": len(out.faces)}
            if args.stages:
                truth = known.get(collection.names[i]) if label == "train" else None
                row.update(stage_scores(gen, mesh, image, z.coords, sampler, args.seed, truth))
            if references:
                row.update(nearest_structure(z.coords, references, gen.structure_vae.config.resolution))
            row["seconds"] = time.perf_counter() - t0
            picture = render_condition(torch.as_tensor(out.vertices, dtype=torch.float32),
                                       torch.as_tensor(out.faces, dtype=torch.int64), cam)
        except Exception as exc:  # noqa: BLE001  (report the mesh and go on)
            row = {"set": label, "mesh": collection.names[i], "fscore": 0.0, "error": str(exc).splitlines()[0]}
            picture = torch.ones_like(image)
        budget.took(time.perf_counter() - t0)
        rows.append(row)
        name = Path(collection.names[i]).stem[:18]
        images[f"{name} cond"] = image.permute(1, 2, 0)
        images[f"{name} F={row['fscore']:.2f}"] = picture.permute(1, 2, 0)
        stages = "  ".join(f"{k} {row[k]:.3f}" for k in STAGES if k in row)
        if "nearest_mesh" in row:
            stages += f"  nearest {Path(row['nearest_mesh']).stem[:24]} {row['nearest_iou']:.3f}"
        print(f"{label:8s} {collection.names[i]:40s} F@0.005 {row['fscore']:.3f}  {stages}{row.get('error', '')}")
    return rows, images, 0


def identify(gen, spec: str, references: list, args, sampler) -> dict:
    """The structure flow alone, on more views than the chain affords: for every `args.every`-th training mesh
    and `args.views` condition views (seeded 1000 + i, 1100 + i, ...: the first is `run_set`'s), generate the
    structure and score it against every training structure. -> {"rows": [...], "identified", "views",
    "mean_own_iou", "mean_nearest_iou"}."""
    from focusing.image_to_3d import generate_structure
    from focusing.train.generation import ConditionConfig

    collection, grid = _collection(spec), gen.structure_vae.config.resolution
    cfg = ConditionConfig(image_size=args.image_size)
    rows = []
    for i in range(0, len(references), args.every):
        mesh = collection.mesh(i)
        for k in range(args.views):
            image, _ = condition_view(mesh, cfg, 1000 + 100 * k + i)
            coords = generate_structure(gen, image, torch.Generator().manual_seed(args.seed), sampler)
            row = {"mesh": collection.names[i], "view": k, "own_iou": _iou(coords, references[i][1].coords, grid),
                   **nearest_structure(coords, references, grid)}
            rows.append(row)
            print(f"{row['mesh'][:32]:32s} view {k}  own {row['own_iou']:.3f}  nearest "
                  f"{Path(row['nearest_mesh']).stem[:24]} {row['nearest_iou']:.3f}")
    n = max(len(rows), 1)
    return {"rows": rows, "identified": sum(r["nearest_mesh"] == r["mesh"] for r in rows), "views": len(rows),
            "mean_own_iou": sum(r["own_iou"] for r in rows) / n,
            "mean_nearest_iou": sum(r["nearest_iou"] for r in rows) / n}


STAGES = ("structure_iou", "structure_vae_iou", "latent_flow_fscore", "shape_vae_fscore", "structure_flow_gain",
          "latent_flow_gain")
GAIN_TS = (0.3, 0.5, 0.7, 0.9)


def _iou(a: torch.Tensor, b: torch.Tensor, grid: int) -> float:
    """IoU of two voxel sets `[N, 4]` (batch 0) at `grid`."""
    from focusing.models.structure_vae import occupancy_grid

    x, y = occupancy_grid(a, 1, grid) > 0, occupancy_grid(b.to(a.device), 1, grid) > 0
    return float((x & y).sum() / (x | y).sum().clamp_min(1))


@torch.no_grad()
def condition_gain(predict, x0: torch.Tensor, cond: torch.Tensor, seed: int) -> float:
    """1 - (flow MSE with the mesh's view) / (flow MSE with no view, the zero condition of CFG), over t in GAIN_TS
    with one seeded noise: ~0 while the flow ignores the view, towards 1 as the view determines the latent (a
    memorised training mesh). x0: one item, normalised, `[1, C, G, G, G]` (dense) or rows `[N, C]` (sparse);
    predict(x_t, t `[1]`, cond) -> velocity like x0; cond `[1, T, D]`."""
    from focusing.flow import diffuse, velocity

    generator = torch.Generator(device=x0.device).manual_seed(seed)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    target = velocity(x0, eps)
    mse = []
    for c in (cond, torch.zeros_like(cond)):
        err = 0.0
        for t in GAIN_TS:
            tt = torch.full((1,), t, device=x0.device)
            err += float(((predict(diffuse(x0, tt, eps), tt, c).float() - target) ** 2).mean())
        mse.append(err)
    return 1.0 - mse[0] / max(mse[1], 1e-12)


@torch.no_grad()
def stage_scores(gen, mesh, image: torch.Tensor, coords: torch.Tensor, sampler, seed: int,
                 truth: SparseTensor | None = None) -> dict:
    """Where a generated shape is lost (one mesh in the normalised frame, its condition `[3, H, W]` and the
    generated structure `coords` `[N, 4]`): `structure_iou` (generated structure vs the mesh's latent voxels),
    `structure_vae_iou` (the structure VAE's reconstruction of those voxels, the structure flow's ceiling),
    `latent_flow_fscore` (F@0.005 of the latent flow sampled on the true voxels), `shape_vae_fscore` (the shape
    VAE's reconstruction, the ceiling of the whole chain), `structure_flow_gain` / `latent_flow_gain`
    (`condition_gain` of each flow on the mesh's true latents). A stage that yields no surface scores 0.
    `truth`: the mesh's latent when already encoded (`training_structures`), else encoded here."""
    from focusing.errors import FocusingError
    from focusing.eval.metrics import surface_metrics
    from focusing.image_to_3d import decode, generate_latent
    from focusing.models.structure_vae import occupancy_grid, occupied_coords

    def fscore(z) -> float:
        try:
            return surface_metrics(decode(gen, z), mesh, normalize=False).fscore
        except FocusingError:
            return 0.0

    svae = gen.structure_vae
    grid = svae.config.resolution
    if truth is None:
        truth = true_latent(gen, mesh, seed)
    true_coords = truth.coords.to(coords.device)
    structure_latent = svae.encode(occupancy_grid(true_coords, 1, grid)).mean
    rebuilt = occupied_coords(svae.decode(structure_latent))
    generator = torch.Generator(device=coords.device).manual_seed(seed)
    on_truth = generate_latent(gen, image, true_coords, generator, sampler)
    sflow, lflow = gen.structure_flow, gen.latent_flow
    image = image[None].to(coords.device)
    structure = sflow.normalize(structure_latent.float(), 1)
    rows = truth.replace(lflow.normalize(truth.feats.float(), 1))
    return {"structure_iou": _iou(coords, true_coords, grid), "structure_vae_iou": _iou(rebuilt, true_coords, grid),
            "latent_flow_fscore": fscore(on_truth), "shape_vae_fscore": fscore(truth),
            "structure_flow_gain": condition_gain(sflow, structure, sflow.encode_condition(image), seed),
            "latent_flow_gain": condition_gain(lambda x, t, c: lflow(rows.replace(x), t, c).feats, rows.feats,
                                               lflow.encode_condition(image), seed)}


def summarize(rows: list[dict], not_run: dict[str, int]) -> dict:
    """{set: {meshes (run), not_run, mean_fscore, at_least_0.8}} for the sets of `not_run`, in its order."""
    summary = {}
    for label, skipped in not_run.items():
        f = [r["fscore"] for r in rows if r["set"] == label]
        summary[label] = {"meshes": len(f), "not_run": skipped, "mean_fscore": sum(f) / max(len(f), 1),
                          "at_least_0.8": sum(x >= 0.8 for x in f)}
        for key in STAGES + ("nearest_iou",):
            got = [r[key] for r in rows if r["set"] == label and key in r]
            if got:
                summary[label][f"mean_{key}"] = sum(got) / len(got)
        if label == "train" and any("nearest_mesh" in r for r in rows):
            summary[label]["identified"] = sum(r.get("nearest_mesh") == r["mesh"] for r in rows if r["set"] == label)
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="generator folder (structure-vae/, ..., shape-vae/; default: the shipped "
                                        "checkpoints/focusing-gen)")
    p.add_argument("--train", required=True, help="the training meshes (packed corpus or folder)")
    p.add_argument("--train-count", type=int, default=32)
    p.add_argument("--heldout", default=None, help="held-out meshes (packed corpus or folder)")
    p.add_argument("--heldout-count", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256, help="condition render size (the training one)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the generator's sampler)")
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the generator's sampler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stages", dest="stages", action="store_false",
                   help="skip the per-stage scores (`stage_scores`: ~3 more decodes a mesh)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget (from the start, loading included): no mesh is started that might "
                   "not finish in it")
    p.add_argument("--identify-only", action="store_true",
                   help="only the structure flow's identification (`identify`): --views views of every --every-th "
                   "training mesh against all --train-count training structures; writes OUT/identification.json")
    p.add_argument("--views", type=int, default=2, help="condition views a mesh with --identify-only")
    p.add_argument("--every", type=int, default=1, help="every n-th training mesh with --identify-only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    budget = Budget(args.max_minutes)

    from focusing.image_to_3d import load_generator, sampler_for
    from focusing.io import write_text_atomic
    from focusing.render.images import save_png
    from focusing.train.config import to_dict
    from focusing.train.logs import image_grid

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = load_generator(args.checkpoint, device=args.device)
    sampler = sampler_for(gen, steps=args.steps, cfg=args.cfg)
    sets = [("train", args.train, args.train_count)] + ([("heldout", args.heldout, args.heldout_count)]
                                                        if args.heldout else [])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    if args.identify_only:
        result = {"device": device, "args": vars(args), "sampler": to_dict(sampler),
                  **identify(gen, args.train, training_structures(gen, args.train, args.train_count, args.seed), args,
                             sampler)}
        write_text_atomic(out / "identification.json", json.dumps(result, indent=1) + "\n")
        print(f"identified {result['identified']} of {result['views']} views; mean IoU with their own structure "
              f"{result['mean_own_iou']:.3f}, with the nearest {result['mean_nearest_iou']:.3f}")
        return result
    rows, not_run, result = [], {}, {}
    references = training_structures(gen, args.train, args.train_count, args.seed) if args.stages else None
    for label, spec, count in sets:
        got, images, not_run[label] = run_set(gen, spec, count, args, sampler, label, budget, references)
        rows += got
        if images:
            save_png(image_grid(images, columns=8), out / f"grid-{label}.png")
        result = {"device": device, "args": vars(args), "sampler": to_dict(sampler),
                  "summary": summarize(rows, not_run), "rows": rows}
        write_text_atomic(out / "generation.json", json.dumps(result, indent=1) + "\n")
    print("\n| set | meshes | mean F@0.005 | meshes with F >= 0.8 | structure IoU | structure VAE IoU "
          "| F, latent flow on the true structure | F, shape VAE | structure flow's condition gain "
          "| latent flow's condition gain |\n|---|---|---|---|---|---|---|---|---|---|")
    for label, s in result["summary"].items():
        skipped = f" ({s['not_run']} not run)" if s["not_run"] else ""
        stages = " | ".join(f"{s[f'mean_{k}']:.3f}" if f"mean_{k}" in s else "-" for k in STAGES)
        print(f"| {label} | {s['meshes']}{skipped} | {s['mean_fscore']:.3f} | {s['at_least_0.8']} | {stages} |")
    if "identified" in result["summary"].get("train", {}):
        s = result["summary"]["train"]
        print(f"\ntraining meshes whose generated structure is nearest their own among the {len(references)} "
              f"training structures: {s['identified']} of {s['meshes']} (mean IoU to the nearest "
              f"{s['mean_nearest_iou']:.3f}, to their own {s['mean_structure_iou']:.3f})")
    return result


if __name__ == "__main__":
    main()
