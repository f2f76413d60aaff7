"""The shipped focusing-S weights (`checkpoints/focusing-s/`): they load as the default checkpoint, fit their config,
and `focusing reconstruct` without --checkpoint gives back the input shape."""

import json

from focusing.cli import main
from focusing.eval.metrics import surface_metrics
from focusing.inference import SHIPPED, default_checkpoint, load_vae
from focusing.io import load_mesh


def test_shipped_weights_are_the_default_and_small():
    assert default_checkpoint() == SHIPPED
    files = sorted(p.name for p in SHIPPED.iterdir())
    assert "config.json" in files and "weights.safetensors" in files
    assert (SHIPPED / "weights.safetensors").stat().st_size <= 16 * 2**20
    config = json.loads((SHIPPED / "config.json").read_text())
    model = load_vae(device="cpu")  # strict: every tensor of the config's model, no other
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert config["model_class"] == "focusing.models.vae.FocusingVAE" and config["dtype"] == "float16"
    assert config["model"]["resolution"] == model.config.resolution == 256


def test_reconstruct_with_the_shipped_weights(data_dir, tmp_path):
    """fandisk (not in the training corpus) at R = 128 with 200K points: a mesh close to the input (F@0.005 of
    the shipped step-3674 weights: 0.953 at 128; random weights give ~0)."""
    out = tmp_path / "fandisk.ply"
    assert main(["reconstruct", str(data_dir / "fandisk.ply"), "-o", str(out), "--resolution", "128",
                 "--points", "200000", "--device", "cpu"]) == 0
    metrics = surface_metrics(load_mesh(out), load_mesh(data_dir / "fandisk.ply"))  # 100K samples
    assert metrics.fscore > 0.9, metrics
