"""Overfit one real mesh with the VAE: F-score@0.005 and Chamfer of its reconstruction against steps and seconds,
next to `fit` on the same mesh (the SparseFlex field optimised directly: what the decoder can express at R).

The run is `focusing train` on a one-mesh source (no augmentation, the config's cameras, carving and zoom), in
chunks of `--eval-every` steps (the trainer checkpoints and resumes exactly between chunks); after each chunk the
model reconstructs the mesh (`focusing.inference.reconstruct_mesh`, inference pruning by the occupancy heads) and
`focusing.eval.metrics.surface_metrics` scores it with the paper's protocol (100K samples, t = 0.005).

    python benchmarks/overfit.py --config configs/tiny.yaml --mesh tests/data/fandisk.ply -r 128 --steps 300 \\
        --eval-every 50 --device cpu --json overfit_tiny_cpu.json --fit
    python benchmarks/overfit.py --config configs/S.yaml --mesh ../shared/data/meshes/bunny.ply -r 256 \\
        --steps 3000 --eval-every 250 --device cuda --json overfit_S_cuda.json --fit
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch


def evaluate(model, gt, resolution: int, points: int) -> dict:
    from focusing.eval.metrics import surface_metrics
    from focusing.inference import reconstruct_mesh

    model.eval()
    try:
        pred = reconstruct_mesh(model, gt, resolution, points=points, normalized=True)
        m = surface_metrics(pred, gt)
        out = {"chamfer": m.chamfer, "fscore": m.fscore, "normal_consistency": m.normal_consistency,
               "faces": len(pred.faces)}
    except Exception as exc:  # an empty reconstruction early in training is a result, not a crash
        out = {"chamfer": float("nan"), "fscore": 0.0, "normal_consistency": 0.0, "faces": 0,
               "error": f"{type(exc).__name__}: {exc}"}
    model.train()
    return out


def write(path: str | None, result: dict) -> None:
    """Write the result JSON atomically, when a path is given."""
    from focusing.io.atomic import write_text_atomic

    if path:
        write_text_atomic(path, json.dumps(result, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--mesh", required=True)
    p.add_argument("-r", "--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--points", type=int, default=None, help="encoder points (default: the config's data.points)")
    p.add_argument("--set", action="append", default=[], help="extra config overrides key=value")
    p.add_argument("--fit", action="store_true", help="also run `fit` at R on the mesh (its default settings)")
    p.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="start from these weights (an exported folder or a checkpoint), e.g. with "
                        "--set model.freeze_pointnet=true to train the rest around a pre-trained PointNet")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new block of --eval-every steps after this (the JSON is written after each eval)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from focusing.device import resolve_device
    from focusing.io import load_mesh, normalize
    from focusing.train.config import to_dict
    from focusing.train.distributed import Distributed
    from focusing.train.experiment import build_model, build_objective, build_source, load_experiment
    from focusing.train.trainer import Trainer

    device = resolve_device(args.device)
    R = args.resolution
    overrides = [f"data.source={args.mesh}", "data.augment=null", f"train.steps={args.steps}", "train.stages=[]",
                 f"train.resolution={R}", "train.checkpoint_every=0", "train.image_every=0", "train.ema_decay=0",
                 f"train.log_every={min(10, args.eval_every)}", *args.set]
    if args.points:
        overrides.append(f"data.points={args.points}")
    cfg = load_experiment(args.config, overrides)
    gt, _ = normalize(load_mesh(args.mesh), args.mesh)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if args.init_from:
        from focusing.train.checkpoint import load_state_dict_strict, load_weights

        state, _ = load_weights(args.init_from)
        load_state_dict_strict(model, state, args.init_from)
    model = model.to(device)
    objective = build_objective(cfg)
    rows = []
    result = {"config": args.config, "mesh": args.mesh, "resolution": R, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "overrides": args.set,
              "init_from": args.init_from, "rows": rows}
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model, objective,
            lambda res, rank, world, start: build_source(cfg, res, rank, world, device, start),
            cfg.train, out, experiment_config=to_dict(cfg), dist=Distributed(device=device), progress=False,
        )
        seconds, step, started = 0.0, 0, time.perf_counter()
        rows.append({"step": 0, "train_seconds": 0.0, **evaluate(model, gt, R, cfg.data.points)})
        print(f"step {0:6d}  {0.0:8.1f} s  F {rows[-1]['fscore']:.4f}  CD {rows[-1]['chamfer']:.3e}", flush=True)
        while step < args.steps and (args.max_minutes is None or
                                     time.perf_counter() - started < 60 * args.max_minutes):
            t0 = time.perf_counter()
            step = trainer.run(resume=step > 0, max_steps=args.eval_every).step
            seconds += time.perf_counter() - t0
            rows.append({"step": step, "train_seconds": seconds, **evaluate(model, gt, R, cfg.data.points)})
            print(f"step {step:6d}  {seconds:8.1f} s  F {rows[-1]['fscore']:.4f}  CD {rows[-1]['chamfer']:.3e}",
                  flush=True)
            write(args.json, result)
    if args.fit:
        from focusing.eval.metrics import surface_metrics
        from focusing.sparseflex.fit import fit_mesh

        t0 = time.perf_counter()
        fitted = fit_mesh(gt, R, device=device)
        m = surface_metrics(fitted, gt)
        result["fit"] = {"seconds": time.perf_counter() - t0, "chamfer": m.chamfer, "fscore": m.fscore,
                         "normal_consistency": m.normal_consistency}
        print(f"fit: {result['fit']['seconds']:.1f} s  F {m.fscore:.4f}  CD {m.chamfer:.3e}")
    print("\n| step | train s | F@0.005 | CD (1e-5) | NC | faces |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['train_seconds']:.0f} | {r['fscore']:.4f} | {r['chamfer'] * 1e5:.2f} | "
              f"{r['normal_consistency']:.3f} | {r['faces']:,} |")
    if "fit" in result:
        f = result["fit"]
        print(f"| fit | {f['seconds']:.0f} | {f['fscore']:.4f} | {f['chamfer'] * 1e5:.2f} | "
              f"{f['normal_consistency']:.3f} | |")
    write(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
