"""The trainer on a tiny real regression: loss falls, resume is exact, time budget, non-finite steps, EMA, images."""

from __future__ import annotations

import math
import time

import pytest
import torch

from focusing.errors import FocusingError
from focusing.train.checkpoint import load_checkpoint, save_checkpoint
from focusing.train.logs import read_metrics
from focusing.train.trainer import Trainer, learning_rate

from train_helpers import MSEObjective, TinyConfig, TinyRegressor, source_factory, train_config

TIMING = {"step_time", "data_wait", "steps_per_s", "samples_per_s"}


def make_trainer(tmp_path, cfg, objective=None, seed=0, dropout=0.1, **source_kw):
    torch.manual_seed(seed)
    model = TinyRegressor(TinyConfig(dropout=dropout))
    return Trainer(model, objective or MSEObjective(), source_factory(cfg.batch_size, **source_kw), cfg, tmp_path,
                   experiment_config={"name": "tiny"}, progress=False)


def test_learning_rate_schedule():
    cfg = train_config(steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60) == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert learning_rate(cfg, 110) == pytest.approx(1e-5)
    lrs = [learning_rate(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_loss_falls(tmp_path):
    cfg = train_config(steps=60, lr=2e-2, warmup_steps=5, batch_size=16)
    result = make_trainer(tmp_path, cfg, dropout=0.0).run()
    assert result.reason == "done" and result.step == 60
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.25 * first, (first, last)
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    for key in ("mse", "batch", "grad_norm", "lr", "step_time", "steps_per_s", "samples_per_s", "resolution"):
        assert key in record
    assert record["batch"] == 16.0 and record["resolution"] == 16.0
    assert load_checkpoint(tmp_path)[1]["step"] == 60


def test_resume_reproduces_an_unbroken_run(tmp_path):
    """Stages (16 then 32), EMA, dropout (torch RNG), source noise (NumPy RNG), objective noise (the generator),
    a log interval of 2 and a stop at an odd step in the middle of stage 2: the resumed run's log and final state
    equal the unbroken run's exactly."""
    cfg = train_config(steps=13, log_every=2, ema_decay=0.9, ema_start=2, stages=[
        {"resolution": 16, "steps": 3}, {"resolution": 32, "steps": 0}])
    whole = make_trainer(tmp_path / "whole", cfg)
    assert whole.run().step == 13

    first = make_trainer(tmp_path / "split", cfg)
    assert first.run(max_steps=5).reason == "steps"
    assert load_checkpoint(tmp_path / "split")[1]["step"] == 5
    second = make_trainer(tmp_path / "split", cfg, seed=99)  # other initial weights: the checkpoint must win
    assert second.run(resume=True).step == 13

    def strip(records):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in records]

    a = strip(read_metrics(tmp_path / "whole" / "metrics.jsonl"))
    b = strip(read_metrics(tmp_path / "split" / "metrics.jsonl"))
    assert [r["step"] for r in a] == [2, 4, 6, 8, 10, 12]
    assert a == b
    ta, ma = load_checkpoint(tmp_path / "whole")
    tb, mb = load_checkpoint(tmp_path / "split")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert ma["ranks"] == mb["ranks"]


def test_resume_on_another_kind_of_device_restarts_only_the_random_streams(tmp_path, capsys):
    """A checkpoint written on a GPU resumes on the CPU: a CUDA generator's state does not fit a CPU generator, so
    the random streams restart (with a note) while weights, optimizer and the data stream continue."""
    cfg = train_config(steps=6)
    assert make_trainer(tmp_path / "gpu", cfg).run(max_steps=3).step == 3
    tensors, meta = load_checkpoint(tmp_path / "gpu")
    for rank in meta["ranks"]:
        rank["rng"]["generator"] = {"device": "cuda:0", "state": [7] * 16}  # what a CUDA generator saves
    save_checkpoint(tmp_path / "gpu" / "checkpoint", tensors, meta)
    assert make_trainer(tmp_path / "gpu", cfg, seed=5).run(resume=True).step == 6
    assert "random streams were saved on cuda, this run is on cpu" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "gpu" / "metrics.jsonl")] == list(range(1, 7))


def test_resume_with_another_train_config_says_where_it_differs(tmp_path, capsys):
    """Resuming under a train config whose steps differ from the checkpoint's (a resume without the first run's
    --set) names the key and both values on stderr and goes on with the new value; the same config, or a changed
    log interval, says nothing."""
    assert make_trainer(tmp_path, train_config(steps=6)).run(max_steps=3).step == 3
    capsys.readouterr()
    assert make_trainer(tmp_path, train_config(steps=4, log_every=2)).run(resume=True).step == 4
    err = capsys.readouterr().err
    assert "differs from the checkpoint's at 'steps' (checkpoint 6, now 4)" in err
    assert make_trainer(tmp_path, train_config(steps=4, log_every=3)).run(resume=True).step == 4
    assert "differs" not in capsys.readouterr().err

def test_stage_sources_are_rebuilt_and_closed(tmp_path):
    cfg = train_config(steps=6, stages=[{"resolution": 16, "steps": 2}, {"resolution": 32, "steps": 2},
                                        {"resolution": 64, "steps": 0}])
    built = []
    factory = source_factory(cfg.batch_size)

    def recording(resolution, rank, world_size, start_step):
        built.append(factory(resolution, rank, world_size, start_step))
        return built[-1]

    trainer = Trainer(TinyRegressor(), MSEObjective(), recording, cfg, tmp_path, experiment_config={},
                      progress=False)
    trainer.run()
    assert [s.scale * 16 for s in built] == [16, 32, 64]
    assert all(s.closed for s in built)
    assert [r["resolution"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [16, 16, 32, 32, 64, 64]


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    cfg = train_config(steps=100_000)
    trainer = make_trainer(tmp_path, cfg, objective=MSEObjective(sleep=0.02))
    started = time.monotonic()
    result = trainer.run(max_minutes=0.06, started=started)
    elapsed = time.monotonic() - started
    assert result.reason == "time"
    assert 0 < result.step < 100_000
    assert elapsed < 0.06 * 60
    assert load_checkpoint(tmp_path)[1]["step"] == result.step


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    cfg = train_config(steps=8)
    trainer = make_trainer(tmp_path, cfg, objective=MSEObjective(nan_steps={2}, inf_grad_steps={5}), dropout=0.0)
    trainer.run()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["nonfinite_total"] for r in records] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] not in (3, 6))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    meta = load_checkpoint(tmp_path)[1]
    assert meta["nonfinite"] == {"in_row": 0, "total": 2}


def test_skipped_step_leaves_weights_unchanged(tmp_path):
    cfg = train_config(steps=3, max_nonfinite=5)
    trainer = make_trainer(tmp_path, cfg, objective=MSEObjective(nan_steps={1, 2}), dropout=0.0)
    trainer.run(max_steps=1)
    after_one = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run(resume=True)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, after_one[key]), key


def test_too_many_nonfinite_in_a_row_stop_the_run(tmp_path):
    cfg = train_config(steps=20, max_nonfinite=3, checkpoint_every=2)
    trainer = make_trainer(tmp_path, cfg, objective=MSEObjective(nan_from=4))
    with pytest.raises(FocusingError, match="3 non-finite losses or gradients in a row"):
        trainer.run()
    assert load_checkpoint(tmp_path)[1]["step"] == 6  # the last checkpoint before the failure is kept


def test_ema_follows_the_weights(tmp_path):
    cfg = train_config(steps=2, ema_decay=0.5, ema_start=1)
    trainer = make_trainer(tmp_path, cfg, dropout=0.0)
    snapshots = []
    step = trainer._train_step

    def recording(want_images):
        out = step(want_images)
        snapshots.append({n: p.detach().clone() for n, p in trainer.named_params})
        return out

    trainer._train_step = recording
    trainer.run()
    tensors, _ = load_checkpoint(tmp_path)
    for name, _ in trainer.named_params:
        # step 0 (before ema_start) copies the weights, step 1 averages with decay 0.5
        expected = 0.5 * snapshots[0][name] + 0.5 * snapshots[1][name]
        torch.testing.assert_close(tensors[f"ema/{name}"], expected)


def test_image_grids_are_written(tmp_path):
    cfg = train_config(steps=6, image_every=3)
    make_trainer(tmp_path, cfg).run()
    pngs = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert pngs == ["step-0000003.png", "step-0000006.png"]
    assert (tmp_path / "images" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
