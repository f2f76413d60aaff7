"""`focusing export RUN -o FOLDER`: the shippable weights of a training run (fp16, EMA when it has one)."""

from __future__ import annotations

import argparse

from focusing.commands.checks import output_folder


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the shippable weights folder of a training run (weights .safetensors + config.json)",
        description="Reads the run's latest checkpoint and writes FOLDER with the model weights (the EMA weights "
        "when the run kept an EMA, unless --no-ema) in --dtype, sharded into files of at most 16 MiB, and "
        "config.json with the model config and the run's step. `focusing reconstruct --checkpoint FOLDER` and "
        "`focusing.inference.load_vae(FOLDER)` read it. The folder is replaced as a whole.",
    )
    p.add_argument("run", help="training run folder (the --out of `focusing train`) or its checkpoint folder")
    p.add_argument("-o", "--output", required=True, type=output_folder, help="weights folder to write")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="weights dtype (default fp16)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if the run kept an EMA")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from focusing.train.checkpoint import export_weights

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    first = export_weights(args.run, args.output, dtype=dtype, use_ema=not args.no_ema)
    files = sorted(p.name for p in first.parent.iterdir())
    print(f"wrote {args.output}: {', '.join(files)}")
    return 0
