"""`focusing train` with injected builders: run folders are never overwritten, --resume / --init-from, --set."""

from __future__ import annotations

import pytest
import torch

from focusing.cli import build_parser
from focusing.commands import train as train_command
from focusing.errors import FocusingError, InputError
from focusing.train.checkpoint import export_weights, load_checkpoint
from focusing.train.logs import read_metrics

from train_helpers import FakeBuilders

CONFIG = """\
train:
  steps: 6
  batch_size: 4
  lr: 1e-2
  warmup_steps: 1
  log_every: 1
  checkpoint_every: 0
  resolution: 16
model:
  width: 8
"""


def run(tmp_path, *argv, builders=None):
    config = tmp_path / "tiny.yaml"
    if not config.exists():
        config.write_text(CONFIG)
    args = build_parser().parse_args(["train", "--config", str(config), "--quiet", *argv])
    return train_command.run(args, builders=builders or FakeBuilders())


def test_help_says_where_the_logs_go(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for word in ("metrics.jsonl", "checkpoint/", "tensorboard", "focusing[tensorboard]", "torchrun"):
        assert word in text


def test_fresh_run_then_resume_with_more_steps(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tmp_path, "--out", str(out)) == 0
    assert "stopped at step 6 of 6 (all steps done)" in capsys.readouterr().out
    assert load_checkpoint(out)[1]["step"] == 6
    assert load_checkpoint(out)[1]["experiment"]["model"] == {"width": 8, "dropout": 0.0}
    assert run(tmp_path, "--out", str(out), "--resume", "--set", "train.steps=9") == 0
    assert "resuming" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 10))
    assert load_checkpoint(out)[1]["step"] == 9


def test_default_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(tmp_path) == 0
    assert load_checkpoint(tmp_path / "runs" / "tiny")[1]["step"] == 6


def test_existing_checkpoint_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    run(tmp_path, "--out", str(out))
    before = (out / "checkpoint" / "checkpoint.json").read_bytes()
    with pytest.raises(InputError, match="already holds a checkpoint at step 6: pass --resume"):
        run(tmp_path, "--out", str(out))
    assert (out / "checkpoint" / "checkpoint.json").read_bytes() == before


def test_resume_without_checkpoint_and_other_refusals(tmp_path):
    with pytest.raises(InputError, match="--resume given, but there is no checkpoint"):
        run(tmp_path, "--out", str(tmp_path / "nothing"), "--resume")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="not empty"):
        run(tmp_path, "--out", str(busy))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        run(tmp_path, "--out", str(tmp_path / "file"))
    with pytest.raises(FocusingError, match="give one of them"):
        run(tmp_path, "--out", str(tmp_path / "x"), "--resume", "--init-from", str(busy))
    with pytest.raises(SystemExit):  # refused by argparse, before any work (tests/test_cli_errors.py: the line)
        run(tmp_path, "--out", str(tmp_path / "y"), "--max-minutes", "0")
    with pytest.raises(InputError, match="tiny.yaml:train: unknown key 'lrr'"):
        run(tmp_path, "--out", str(tmp_path / "z"), "--set", "train.lrr=1")


def test_init_from_takes_the_weights_only(tmp_path):
    run(tmp_path, "--out", str(tmp_path / "first"))
    export_weights(tmp_path / "first", tmp_path / "shipped", dtype=torch.float32, use_ema=False)
    first, _ = load_checkpoint(tmp_path / "first")
    captured = {}

    class Capturing(FakeBuilders):
        @staticmethod
        def build_objective(cfg):
            objective = FakeBuilders.build_objective(cfg)

            def call(model, batch, **kw):
                captured.setdefault("weight", model.net[0].weight.detach().clone())
                return objective(model, batch, **kw)
            return call

    run(tmp_path, "--out", str(tmp_path / "second"), "--init-from", str(tmp_path / "shipped"),
        "--set", "train.resolution=32", builders=Capturing())
    assert torch.equal(captured["weight"], first["model/net.0.weight"])
    second = load_checkpoint(tmp_path / "second")[1]
    assert second["step"] == 6  # a new run: the step and the optimizer start from zero
    with pytest.raises(InputError, match="key 'net.0.weight' has shape"):
        run(tmp_path, "--out", str(tmp_path / "third"), "--init-from", str(tmp_path / "first"),
            "--set", "model.width=12")


def test_max_minutes_reaches_the_trainer(tmp_path, capsys):
    out = tmp_path / "run"
    run(tmp_path, "--out", str(out), "--max-minutes", "0.001", "--set", "train.steps=1000")
    assert "--max-minutes budget reached" in capsys.readouterr().out
    assert load_checkpoint(out)[1]["step"] < 1000
