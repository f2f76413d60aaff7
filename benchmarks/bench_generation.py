"""The image-to-3D demonstration (issue 12): condition on a render of a mesh, generate, score against the mesh.

For each mesh of --train (meshes the generator was trained on) and --heldout (never trained on): render one
condition view (the training condition: a shaded normal map from a random camera, seeded per mesh), generate
with `focusing.image_to_3d.generate`, and measure F@0.005 / Chamfer of the generated mesh against the mesh in
the normalised frame (`focusing.eval.metrics.surface_metrics`, the generated mesh is in that frame). Prints a
table, writes OUT/generation.json and OUT/grid-train.png, OUT/grid-heldout.png (condition image | generated
mesh rendered from the same camera). Target (issue 12): F >= 0.8 on every training mesh.

    python benchmarks/bench_generation.py --checkpoint checkpoints/gen --train .devdata/corpus.safetensors \
        --train-count 32 --heldout /work/shared/data/meshes --heldout-count 8 --out $OUT/gen
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _collection(spec: str):
    from focusing.data.corpus import is_packed_corpus
    from focusing.data.online import MeshFolder, PackedMeshes

    path = Path(spec)
    return PackedMeshes(path) if path.is_file() and is_packed_corpus(path) else MeshFolder([path])


def run_set(gen, spec: str, count: int, args, label: str) -> tuple[list[dict], dict]:
    from focusing.eval.metrics import surface_metrics
    from focusing.flow import SamplerConfig
    from focusing.image_to_3d import generate
    from focusing.train.generation import ConditionConfig, condition_cameras, render_condition

    collection = _collection(spec)
    cfg = ConditionConfig(image_size=args.image_size)
    sampler = SamplerConfig(steps=args.steps, cfg=args.cfg)
    rows, images = [], {}
    for i in range(min(count, len(collection))):
        mesh = collection.mesh(i)
        v = torch.as_tensor(mesh.vertices, dtype=torch.float32)
        f = torch.as_tensor(mesh.faces, dtype=torch.int64)
        cam = condition_cameras(1, cfg, torch.Generator().manual_seed(1000 + i))[0]
        image = render_condition(v, f, cam)
        t0 = time.perf_counter()
        try:
            out = generate(gen, image, seed=args.seed, structure_sampler=sampler, latent_sampler=sampler)
            m = surface_metrics(out, mesh, normalize=False)
            row = {"set": label, "mesh": collection.names[i], "fscore": m.fscore, "chamfer": m.chamfer,
                   "faces": len(out.faces), "seconds": time.perf_counter() - t0}
            picture = render_condition(torch.as_tensor(out.vertices, dtype=torch.float32),
                                       torch.as_tensor(out.faces, dtype=torch.int64), cam)
        except Exception as exc:  # noqa: BLE001  (report the mesh and go on)
            row = {"set": label, "mesh": collection.names[i], "fscore": 0.0, "error": str(exc).splitlines()[0]}
            picture = torch.ones_like(image)
        rows.append(row)
        name = Path(collection.names[i]).stem[:18]
        images[f"{name} cond"] = image.permute(1, 2, 0)
        images[f"{name} F={row['fscore']:.2f}"] = picture.permute(1, 2, 0)
        print(f"{label:8s} {collection.names[i]:40s} F@0.005 {row['fscore']:.3f}  {row.get('error', '')}")
    return rows, images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="generator folder (structure-vae/, ..., shape-vae/)")
    p.add_argument("--train", required=True, help="the training meshes (packed corpus or folder)")
    p.add_argument("--train-count", type=int, default=32)
    p.add_argument("--heldout", default=None, help="held-out meshes (packed corpus or folder)")
    p.add_argument("--heldout-count", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256, help="condition render size (the training one)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    from focusing.image_to_3d import load_generator
    from focusing.render.images import save_png
    from focusing.train.logs import image_grid

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = load_generator(args.checkpoint, device=args.device)
    sets = [("train", args.train, args.train_count)] + ([("heldout", args.heldout, args.heldout_count)]
                                                        if args.heldout else [])
    rows = []
    for label, spec, count in sets:
        got, images = run_set(gen, spec, count, args, label)
        rows += got
        save_png(image_grid(images, columns=8), out / f"grid-{label}.png")
    summary = {}
    for label, _, _ in sets:
        f = [r["fscore"] for r in rows if r["set"] == label]
        summary[label] = {"meshes": len(f), "mean_fscore": sum(f) / max(len(f), 1),
                          "at_least_0.8": sum(x >= 0.8 for x in f)}
    print(f"\n| set | meshes | mean F@0.005 | meshes with F >= 0.8 |\n|---|---|---|---|")
    for label, s in summary.items():
        print(f"| {label} | {s['meshes']} | {s['mean_fscore']:.3f} | {s['at_least_0.8']} |")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    (out / "generation.json").write_text(json.dumps({"device": device, "args": vars(args), "summary": summary,
                                                     "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
