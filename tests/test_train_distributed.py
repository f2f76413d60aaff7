"""Two gloo processes average the same gradients as one process on the concatenated batch (DDP semantics)."""

from __future__ import annotations

import dataclasses
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from focusing.train.checkpoint import load_checkpoint
from focusing.train.trainer import Trainer

from train_helpers import (
    MSEObjective, TinyRegressor, distributed_batch, distributed_config, distributed_worker, source_factory,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    # three trainer steps in one process on batches of 8 (first: the children then inherit the lazily imported
    # optimizer machinery, seconds on a busy 2-core box)
    torch.manual_seed(0)
    single = Trainer(TinyRegressor(), MSEObjective(noise=0.0), source_factory(8, augment=0.0),
                     dataclasses.replace(distributed_config(), batch_size=8),
                     tmp_path / "single", experiment_config={}, progress=False)
    single.run()
    # fork, not spawn: a spawned child re-imports torch (15 s there)
    mp.start_processes(distributed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")

    # gradients: rank 0's initial weights, the full batch of 8 in one process
    torch.manual_seed(0)
    model = TinyRegressor()
    x, y = distributed_batch()
    torch.nn.functional.mse_loss(model(x), y).backward()
    for rank in (0, 1):
        grads = load_file(str(tmp_path / f"grads-{rank}.safetensors"))
        assert "unused.bias" not in grads  # no gradient on any rank: stays None, as in one process
        torch.testing.assert_close(grads["unused.weight"], torch.full((2, 3), 0.5))  # used on one rank of two
        for name, p in model.named_parameters():
            if not name.startswith("unused"):
                torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)

    # three trainer steps: batch 4 per rank on 2 ranks == batch 8 in one process
    two, meta = load_checkpoint(tmp_path / "run")
    one, _ = load_checkpoint(tmp_path / "single")
    assert meta["world_size"] == 2 and len(meta["ranks"]) == 2
    torch.manual_seed(0)
    initial = TinyRegressor().state_dict()
    for name, value in initial.items():
        key = f"model/{name}"
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
        if name.startswith("net") and name.endswith("weight"):
            assert (one[key] - value).abs().max() > 1e-3  # the steps moved the weights
