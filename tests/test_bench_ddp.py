"""benchmarks/bench_ddp.py on the CPU: a run of 3 steps in one process (batch 2) and in two gloo processes
(batch 1 each) see the same meshes and make one comparable record each; the loss test passes noise and fails a
persistent gap; the table's scaling efficiency."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_ddp", ROOT / "benchmarks" / "bench_ddp.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def tiny_args(json_path, batch):
    return ["--config", "tiny", "--resolution", "32", "--steps", "3", "--warmup", "1", "--device", "cpu",
            "--batch", str(batch), "--set", f"data.source={ROOT / 'tests' / 'data'}", "--json", str(json_path)]


def _rank(rank, world_size, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    bench.main(argv)


def test_one_and_two_processes_make_comparable_records(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(tiny_args(tmp_path / "n1.json", 2)) == 0
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules (a spawned child re-imports torch)
    mp.start_processes(_rank, args=(2, port, tiny_args(tmp_path / "n2.json", 1)), nprocs=2, join=True,
                       start_method="fork")
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("n1", "n2"))
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    assert (one["world_size"], one["batch_per_rank"], one["backend"]) == (1, 2, None)
    assert (two["world_size"], two["batch_per_rank"], two["backend"]) == (2, 1, "gloo")
    for run in (one, two):
        assert run["steps_run"] == 3 and run["timed_steps"] == 1 and run["stopped"] == "done"
        assert run["samples_per_s"] == pytest.approx(2 / run["median_step_s"])
        assert run["peak_memory_gib"] is None and run["params_identical_on_ranks"]
        assert len(run["loss"]) == 3 and all(x > 0 for x in run["loss"])
        assert len(run["rank_losses"]) == run["world_size"]
    assert two["loss"] == pytest.approx([sum(x) / 2 for x in zip(*two["rank_losses"])])
    assert one["ids"] == two["ids"] and all(len(ids) == 2 for ids in one["ids"])
    assert bench.comparable(one, two) == []
    table = bench.merge_table([one, two]).splitlines()
    assert len(table) == 4 and "| gloo" not in table[2] and "cpu, gloo |" in table[3]


def _noisy(n, seed, offset=0.0):
    rng = random.Random(seed)
    return [2.0 * 0.97**i + rng.gauss(0.0, 0.1) + (offset if i < n // 2 else 0.0) for i in range(n)]


def test_loss_test_passes_noise_and_fails_a_persistent_gap():
    a = _noisy(50, 0)
    same = bench.compare_losses(a, _noisy(50, 1))
    assert same["follows"] and same["steps"] == 50 and len(same["batch_gaps"]) == 5
    assert 0.1 < same["step_noise"] < 0.2  # two independent noises of 0.1: sqrt(2) x 0.1
    gap = bench.compare_losses(a, _noisy(50, 1, offset=0.3))
    assert not gap["follows"]
    skipped = bench.compare_losses(a, [None] + _noisy(50, 1)[1:])  # a skipped (non-finite) step is left out
    assert skipped["steps"] == 45
    with pytest.raises(ValueError):
        bench.compare_losses(a[:5], a[:5])


def _record(world_size, batch, samples_per_s, ids, **experiment):
    return {"config": "S", "resolution": 512, "world_size": world_size, "batch_per_rank": batch,
            "global_batch": world_size * batch, "init_from": None, "ids": ids,
            "experiment": {"train": {"batch_size": batch, "lr": 1e-4}, **experiment},
            "samples_per_s": samples_per_s, "median_step_s": world_size * batch / samples_per_s,
            "steps_per_s": samples_per_s / (world_size * batch), "timed_steps": 45,
            "peak_memory_gib": [10.0] * world_size,
            "params_identical_on_ranks": True, "machine": "H200", "backend": "nccl" if world_size > 1 else None}


def test_comparability_and_scaling_efficiency():
    ids = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    one, two = _record(1, 4, 10.0, ids), _record(2, 2, 18.0, ids)
    assert bench.comparable(one, two) == []
    assert bench.efficiency(two, one) == pytest.approx(0.9)
    other = _record(2, 2, 18.0, [ids[0], ["e", "f", "h", "g"]], views={"zoom": False})
    assert bench.comparable(one, other) == [
        "different experiment settings (other than train.batch_size)",
        "different meshes at step 1: ['e', 'f', 'g', 'h'] vs ['e', 'f', 'h', 'g']"]
    rows = bench.merge_table([one, two, _record(2, 4, 19.0, ids)]).splitlines()[2:]
    assert [row.split("|")[10].strip() for row in rows] == ["1.00", "0.90", "0.95"]
