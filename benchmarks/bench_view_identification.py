"""Can a structure flow's image encoder tell its training meshes apart from one random view? (issue 12)

The structure flow memorises its training structures but gives back the wrong one for many condition views
(docs/GENERATION.md, run 3): its image side must identify the mesh from any view. This measures that ability
alone, without the flow: the image encoder of a structure-flow config (`model.image`, with the config's
condition renders) plus a small head (mean of the tokens -> MLP) is trained to regress each mesh's structure
latent (the frozen structure VAE's posterior mean, normalised) from a fresh random view per item and step; every
--eval-every steps a fixed set of unseen views (--eval-views per mesh) is scored: a view is identified when the
nearest training latent to the prediction is its own mesh. Prints a table, writes JSON.

    python benchmarks/bench_view_identification.py --config configs/gen-demo-structure-flow.yaml \
        --set structure_vae=GEN/structure-vae --set model.resolution=8 --set train.resolution=128 \
        --steps 1500 --json out/view_identification.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def structure_latents(cfg, count: int, device) -> tuple[dict, torch.Tensor]:
    """(the batch of the first `count` meshes of the config's data, their normalised structure latents `[M, D]`)."""
    from focusing.data.online import make_source
    from focusing.image_to_3d import load_structure_vae
    from focusing.train.generation import _structure

    source = make_source(cfg.data.source, resolution=cfg.train.resolution, points=1, batch_size=count,
                         device=device, augment=None, exclude=cfg.data.exclude, latent_only=True, prefetch=0)
    count = min(count, len(source))
    source.batch_size = count
    batch = source.build(0)
    vae = load_structure_vae(cfg.structure_vae, device)
    with torch.no_grad():
        x0 = vae.encode(_structure(batch)).mean.float().flatten(1)
    return batch, (x0 - x0.mean()) / x0.std()


def identified(pred: torch.Tensor, targets: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Per prediction `[V, D]`: is the nearest of `targets` `[M, D]` its own (index `own` `[V]`)? -> bool `[V]`."""
    return torch.cdist(pred, targets).argmin(1) == own


def main(argv=None) -> int:
    from focusing.models.image_encoder import build_image_encoder, resize_images
    from focusing.train.experiment import load_experiment
    from focusing.train.generation import condition_images

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/gen-demo-structure-flow.yaml", help="a structure_flow config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--count", type=int, default=32, help="training meshes (the first of the config's data)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-views", type=int, default=2, help="unseen views per mesh in the evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cfg = load_experiment(args.config, args.set)
    if cfg.kind != "structure_flow":
        ap.error(f"--config must be a structure_flow config, got kind {cfg.kind!r}")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    batch, targets = structure_latents(cfg, args.count, device)
    meshes = list(zip(batch["vertices"], batch["faces"]))
    m = len(meshes)
    encoder = build_image_encoder(cfg.model.image).to(device)
    width = encoder.out_channels
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 256), nn.GELU(), nn.Linear(256, targets.shape[1]))
    head.to(device)
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    def predict(images):
        return head(encoder(resize_images(images, cfg.model.image.image_size)).mean(1))

    def views(index, generator):
        return condition_images([meshes[i][0] for i in index], [meshes[i][1] for i in index], cfg.condition,
                                generator)

    g_eval = torch.Generator(device).manual_seed(args.seed + 1)
    own = torch.arange(m, device=device).repeat(args.eval_views)
    eval_images = views(own.tolist(), g_eval)
    g = torch.Generator(device).manual_seed(args.seed)
    rows, t0 = [], time.perf_counter()
    floor = float((targets - targets.mean(0)).square().mean())  # eval mse of predicting the mean latent
    print(f"{m} meshes, image encoder {cfg.model.image.kind} ({sum(p.numel() for p in params) / 1e6:.2f}M "
          f"parameters with the head), {len(own)} evaluation views; predicting the mean latent: mse {floor:.3f}, "
          f"chance: {len(own) / m:.0f} identified")
    print(f"{'step':>6} {'loss':>7} {'eval mse':>9} {'identified':>11} {'s':>6}")
    for step in range(1, args.steps + 1):
        index = torch.randint(0, m, (args.batch,), generator=g, device=device)
        loss = (predict(views(index.tolist(), g)) - targets[index]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                pred = torch.cat([predict(chunk) for chunk in eval_images.split(32)])
                hit = identified(pred, targets, own)
                mse = float((pred - targets[own]).square().mean())
            rows.append({"step": step, "loss": loss.item(), "eval_mse": mse, "identified": int(hit.sum()),
                         "views": len(own), "seconds": time.perf_counter() - t0,
                         "per_mesh": hit.view(args.eval_views, m).sum(0).tolist()})
            r = rows[-1]
            print(f"{step:>6} {r['loss']:>7.3f} {mse:>9.3f} {r['identified']:>5} of {len(own):<3} {r['seconds']:>6.0f}")
    result = {"config": args.config, "overrides": args.set, "meshes": batch["ids"], "steps": args.steps,
              "mean_latent_mse": floor, "batch": args.batch, "lr": args.lr, "device": args.device, "rows": rows}
    if args.json:
        from focusing.io.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
