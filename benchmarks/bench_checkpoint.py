"""Size and write / read time of a full training checkpoint (fp32 weights + AdamW moments [+ EMA]) and of the fp16
export, for models of a given parameter count, so the trainer's --max-minutes budget and the 64 MiB that travel
back from the GPU machine can be planned.

    python benchmarks/bench_checkpoint.py                                # 2M, 4M, 8M parameters, EMA on and off
    python benchmarks/bench_checkpoint.py --params 8e6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's `focusing`, also without `pip install -e .`

import torch  # noqa: E402

from focusing.train.checkpoint import SHARD_BYTES, export_weights, load_checkpoint, pack_state, save_checkpoint  # noqa: E402


def measure(params: int, ema: bool, folder: Path) -> dict:
    """One checkpoint of a model of about `params` parameters (768-wide matrices) after one AdamW step."""
    rows = max(params // 768, 1)
    sizes = [3072] * (rows // 3072) + ([rows % 3072] if rows % 3072 else [])
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n, 768)) for n in sizes])
    opt = torch.optim.AdamW(model.parameters())
    sum(p.sum() for p in model).backward()
    opt.step()
    tensors = {f"model/{i}": p.detach().clone() for i, p in enumerate(model)}
    if ema:
        tensors.update({f"ema/{i}": p.detach().clone() for i, p in enumerate(model)})
    meta = {"step": 1, "optimizer": pack_state(opt.state_dict(), "optimizer", tensors)}
    t0 = time.perf_counter()
    size = save_checkpoint(folder / "checkpoint", tensors, meta)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_checkpoint(folder)
    load_s = time.perf_counter() - t0
    weights = export_weights(folder, folder / "export")
    files = len(list((folder / "checkpoint").iterdir()))
    return {"params": sum(p.numel() for p in model), "ema": ema, "checkpoint_mib": size / 2**20, "files": files,
            "save_s": save_s, "load_s": load_s, "export_fp16_mib": weights.stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, nargs="+", default=[2e6, 4e6, 8e6])
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    rows = []
    for params in args.params:
        for ema in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(measure(int(params), ema, Path(tmp)))
    print(f"shard size {SHARD_BYTES / 2**20:.0f} MiB, files = shards + checkpoint.json; "
          f"{platform.node()}, {platform.processor() or platform.machine()}")
    print(f"{'params':>10} {'ema':>4} {'ckpt MiB':>9} {'files':>5} {'save s':>7} {'load s':>7} {'fp16 MiB':>9}")
    for r in rows:
        print(f"{r['params']:>10} {str(r['ema']):>4} {r['checkpoint_mib']:>9.1f} {r['files']:>5} {r['save_s']:>7.2f} "
              f"{r['load_s']:>7.2f} {r['export_fp16_mib']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
