"""Checkpoints without pickle: state trees, sharding by size, the atomic swap, export and strict loading."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import focusing.train.checkpoint as ckpt
from focusing.errors import InputError
from focusing.train.checkpoint import (
    export_weights, find_checkpoint, load_checkpoint, load_state_dict_strict, load_weights, pack_state,
    save_checkpoint, unpack_state,
)
from focusing.train.rng import rng_state, seed_everything, set_rng_state
from focusing.train.trainer import Trainer

from train_helpers import MSEObjective, TinyConfig, TinyRegressor, source_factory, train_config


def assert_no_pickle(folder):
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.suffix in (".json", ".jsonl", ".safetensors"), path
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle / torch.save file"


def test_state_tree_round_trip():
    tree = {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3)}, 7: {"m": torch.zeros(1)}},
            "groups": [{"betas": (0.9, 0.99), "lr": 1e-4, "params": [0, 7], "flag": None}],
            "np": np.arange(5, dtype=np.uint32), "nan": float("nan"), "bits": torch.tensor([1, 255], dtype=torch.uint8)}
    tensors = {}
    packed = pack_state(tree, "opt", tensors)
    back = unpack_state(json.loads(json.dumps(packed)), tensors)
    assert set(back["state"]) == {0, 7}
    assert torch.equal(back["state"][0]["m"], tree["state"][0]["m"])
    assert back["groups"][0]["betas"] == (0.9, 0.99)
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    assert back["bits"].dtype == torch.uint8 and back["nan"] != back["nan"]


def test_rng_state_round_trip():
    gen = torch.Generator()
    seed_everything(5, gen)
    state = rng_state(gen)
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    set_rng_state(state, gen)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item()) == first


def test_sharded_save_load_without_pickle(tmp_path):
    limit = 8192
    tensors = {"big": torch.randn(5000), "mat": torch.randn(30, 20), "half": torch.randn(100).half(),
               "ints": torch.arange(7), **{f"small/{i}": torch.randn(3) for i in range(40)}}
    total = save_checkpoint(tmp_path / "checkpoint", tensors, {"step": 3, "note": "x"}, shard_bytes=limit)
    files = sorted((tmp_path / "checkpoint").iterdir())
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert 3 <= len(shards) <= 4  # 23 KB in 8 KB files: the 20 KB tensor is split across file boundaries
    assert all(f.stat().st_size <= limit for f in shards)
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in files)  # plain permissions, not a temp file's 0600
    assert total == sum(f.stat().st_size for f in files)
    assert_no_pickle(tmp_path)
    back, meta = load_checkpoint(tmp_path)
    assert meta == {"step": 3, "note": "x"}
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_missing_shard_is_one_clear_line(tmp_path):
    save_checkpoint(tmp_path / "checkpoint", {"a": torch.randn(3000), "b": torch.randn(3000)}, {"step": 1},
                    shard_bytes=16384)
    victim = sorted((tmp_path / "checkpoint").glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(InputError, match=f"{victim.name}: missing file"):
        load_checkpoint(tmp_path)


def test_atomic_swap_keeps_only_the_latest(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint"
    save_checkpoint(target, {"w": torch.zeros(4)}, {"step": 1})
    save_checkpoint(target, {"w": torch.ones(4)}, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert load_checkpoint(tmp_path)[1]["step"] == 2

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, {"w": torch.full((4,), 3.0)}, {"step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temporary folder left behind
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 2 and torch.equal(tensors["w"], torch.ones(4))


def test_a_crash_between_the_renames_leaves_the_old_checkpoint_findable(tmp_path):
    save_checkpoint(tmp_path / "checkpoint", {"w": torch.ones(2)}, {"step": 4})
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")
    assert find_checkpoint(tmp_path) == tmp_path / ".checkpoint.old"
    assert load_checkpoint(tmp_path)[1]["step"] == 4
    save_checkpoint(tmp_path / "checkpoint", {"w": torch.ones(2)}, {"step": 5})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def trained_checkpoint(tmp_path, **cfg):
    torch.manual_seed(0)
    trainer = Trainer(TinyRegressor(TinyConfig(width=24)), MSEObjective(), source_factory(4),
                      train_config(steps=3, **cfg), tmp_path / "run", experiment_config={"name": "tiny"},
                      progress=False)
    trainer.run()
    return trainer


def test_trainer_checkpoint_contents(tmp_path):
    trainer = trained_checkpoint(tmp_path, ema_decay=0.9, checkpoint_shard_mb=0.004)
    folder = tmp_path / "run" / "checkpoint"
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert all(f.stat().st_size <= 0.004 * 2**20 for f in folder.iterdir() if f.suffix == ".safetensors")
    assert_no_pickle(tmp_path / "run")
    tensors, meta = load_checkpoint(folder)
    assert meta["step"] == 3 and meta["model_config"] == {"width": 24, "dropout": 0.0}
    assert meta["experiment"] == {"name": "tiny"} and meta["train"]["ema_decay"] == 0.9
    assert tensors["model/net.0.weight"].dtype == torch.float32
    assert "model/calls" in tensors and tensors["model/calls"].dtype == torch.int64
    assert "ema/net.0.weight" in tensors and "optimizer/state/0/exp_avg" in tensors
    assert len(meta["ranks"]) == 1 and set(meta["ranks"][0]["rng"]) == {"python", "numpy", "torch", "cuda",
                                                                         "generator"}
    assert meta["ranks"][0]["source"] == {"epoch": 0, "pos": 12}


def test_export_weights_fp16_round_trip(tmp_path):
    trainer = trained_checkpoint(tmp_path, ema_decay=0.5)
    tensors, _ = load_checkpoint(tmp_path / "run")
    weights = export_weights(tmp_path / "run", tmp_path / "export")
    assert weights == tmp_path / "export" / "weights.safetensors"
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "weights.safetensors"]
    assert weights.stat().st_size <= 16 * 2**20
    assert_no_pickle(tmp_path / "export")
    state, config = load_weights(tmp_path / "export", config={"width": 24, "dropout": 0.0})
    assert config == {"width": 24, "dropout": 0.0}
    assert state["net.0.weight"].dtype == torch.float16 and state["calls"].dtype == torch.int64
    assert torch.equal(state["net.0.weight"], tensors["ema/net.0.weight"].half())  # EMA, not the raw weights
    fresh = TinyRegressor(TinyConfig(width=24))
    load_state_dict_strict(fresh, state, tmp_path / "export")
    torch.testing.assert_close(fresh.net[0].weight, tensors["ema/net.0.weight"], atol=1e-3, rtol=1e-3)
    raw, _ = load_weights(tmp_path / "run")
    assert torch.equal(raw["net.0.weight"], trainer.model.net[0].weight.detach())
    export_weights(tmp_path / "run", tmp_path / "raw", dtype=torch.float32, use_ema=False)
    assert torch.equal(load_weights(tmp_path / "raw")[0]["net.0.weight"], raw["net.0.weight"])


def test_load_weights_errors_name_the_problem(tmp_path):
    trained_checkpoint(tmp_path)
    export_weights(tmp_path / "run", tmp_path / "export")
    with pytest.raises(InputError, match="config.json: model config differs at 'width': stored 24, expected 32"):
        load_weights(tmp_path / "export", config={"width": 32, "dropout": 0.0})
    state, _ = load_weights(tmp_path / "export")
    with pytest.raises(InputError, match=r"key 'net.0.weight' has shape \[24, 4\], the model expects \[16, 4\]"):
        load_state_dict_strict(TinyRegressor(TinyConfig(width=16)), state, "w")
    with pytest.raises(InputError, match="missing key 'calls'"):
        load_state_dict_strict(TinyRegressor(TinyConfig(width=24)), {k: v for k, v in state.items()
                                                                     if k != "calls"}, "w")
    with pytest.raises(InputError, match="unexpected key 'extra'"):
        load_state_dict_strict(TinyRegressor(TinyConfig(width=24)), {**state, "extra": torch.zeros(1)}, "w")
    (tmp_path / "export" / "weights.safetensors").unlink()
    with pytest.raises(InputError, match="weights.safetensors: missing file"):
        load_weights(tmp_path / "export")
    with pytest.raises(InputError, match="no weights here"):
        load_weights(tmp_path)
