"""The trainer on CUDA: bf16 autocast + fused AdamW and fp16 with the grad scaler train and resume exactly."""

from __future__ import annotations

import pytest
import torch

from focusing.train.checkpoint import load_checkpoint
from focusing.train.distributed import Distributed
from focusing.train.logs import read_metrics
from focusing.train.trainer import Trainer

from train_helpers import MSEObjective, TinyConfig, TinyRegressor, RegressionSource, train_config

pytestmark = pytest.mark.gpu


class CudaSource(RegressionSource):
    def next_batch(self):
        x, y = super().next_batch()
        return x.cuda(), y.cuda()


def make(tmp_path, cfg, seed=0):
    torch.manual_seed(seed)
    factory = lambda r, rank, world, start: CudaSource(r, rank, world, batch_size=cfg.batch_size)  # noqa: E731
    return Trainer(TinyRegressor(TinyConfig(dropout=0.1)), MSEObjective(), factory, cfg, tmp_path,
                   experiment_config={}, dist=Distributed(device=torch.device("cuda")), progress=False)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_trains_and_resumes_exactly(tmp_path, amp):
    cfg = train_config(steps=40, amp=amp, ema_decay=0.9, batch_size=16, lr=2e-2)
    make(tmp_path / "whole", cfg).run()
    losses = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert "peak_memory_gib" in read_metrics(tmp_path / "whole" / "metrics.jsonl")[-1]
    make(tmp_path / "split", cfg).run(max_steps=17)
    make(tmp_path / "split", cfg, seed=1).run(resume=True)
    a = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert a == losses
    ta, meta = load_checkpoint(tmp_path / "whole")
    tb, _ = load_checkpoint(tmp_path / "split")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (meta["scaler"] is not None) == (amp == "fp16")
