"""End to end on the CPU with a freshly initialised tiny model: `focusing train` (real builders, one step) ->
`focusing export` -> `reconstruct` / `encode` / `decode`, the `vae` benchmark method, and one-line errors."""

import json

import pytest

from focusing.cli import main
from focusing.io import load_mesh


@pytest.fixture(scope="module")
def weights(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("vae")
    run = root / "run"
    code = main(["train", "--config", "configs/tiny.yaml", "--out", str(run), "--quiet", "--device", "cpu",
                 "--set", f"data.source={data_dir / 'fandisk.ply'}", "--set", "train.steps=1",
                 "--set", "train.stages=[]", "--set", "train.resolution=32", "--set", "train.image_every=0"])
    assert code == 0 and (run / "checkpoint" / "checkpoint.json").is_file()
    assert main(["export", str(run), "-o", str(root / "weights")]) == 0
    return root / "weights"


def test_reconstruct_encode_decode(weights, data_dir, tmp_path, capsys):
    mesh = data_dir / "fandisk.ply"
    out = tmp_path / "rec.ply"
    assert main(["reconstruct", str(mesh), "-o", str(out), "--checkpoint", str(weights), "--points", "20000",
                 "--device", "cpu"]) == 0
    rec = load_mesh(out)
    lo, hi = load_mesh(mesh).bounds
    pad = (hi - lo).max() * 4 / 32 * 1.01  # within one latent voxel of the input, in the input's units
    assert len(rec.faces) > 0 and (rec.vertices >= lo - pad).all() and (rec.vertices <= hi + pad).all()
    latent = tmp_path / "z.safetensors"
    assert main(["encode", str(mesh), "-o", str(latent), "--checkpoint", str(weights), "--points", "20000",
                 "--device", "cpu"]) == 0
    assert main(["decode", str(latent), "-o", str(tmp_path / "dec.ply"), "--checkpoint", str(weights),
                 "--device", "cpu", "--tile", "3"]) == 0
    dec = load_mesh(tmp_path / "dec.ply")
    assert len(dec.faces) == len(rec.faces)  # same seed and points: the same mesh, tiled or not
    assert main(["decode", str(latent), "-o", str(tmp_path / "dec_loose.ply"), "--checkpoint", str(weights),
                 "--device", "cpu", "--keep-logit", "-1"]) == 0
    assert 0 < len(load_mesh(tmp_path / "dec_loose.ply").faces) != len(dec.faces)  # p > 0.27 keeps more voxels
    assert "latent voxels" in capsys.readouterr().out


def test_vae_benchmark_method(weights, data_dir):
    from focusing.eval.baselines import make_method
    from focusing.io import normalize

    gt, _ = normalize(load_mesh(data_dir / "fandisk.ply"))
    method = make_method("vae", {"checkpoint": str(weights), "points": "20000", "device": "cpu"})
    pred = method.reconstruct(gt, 32)
    assert len(pred.faces) > 0 and abs(pred.vertices).max() < 0.5 + 4 / 32


@pytest.mark.parametrize("argv,fragment", [
    (["decode", "missing.safetensors", "-o", "x.ply"], "missing.safetensors: no such file"),
    (["reconstruct", "{mesh}", "-o", "x.ply", "--checkpoint", "{tmp}"], "no weights here"),
    (["reconstruct", "{mesh}", "-o", "x.ply", "--checkpoint", "{weights}", "-r", "30"], "multiple of 4"),
    (["encode", "{mesh}", "-o", "x.ply", "--checkpoint", "{weights}"], "x.ply"),
])
def test_one_line_errors(weights, data_dir, tmp_path, capsys, argv, fragment):
    argv = [a.format(mesh=data_dir / "fandisk.ply", tmp=tmp_path, weights=weights) for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in err[0]


def test_resume_of_a_real_run_repeats_the_losses(tmp_path, data_dir, capsys):
    """The real objective and data source under `--resume`: a run stopped after 2 steps and resumed gives the
    same losses as one run of 4 (cameras, zoom draws, posterior noise and samples all restored)."""
    from focusing.train.logs import read_metrics

    common = ["--config", "configs/tiny.yaml", "--quiet", "--device", "cpu",
              "--set", f"data.source={data_dir / 'fandisk.ply'}", "--set", "data.points=2000",
              "--set", "train.stages=[]", "--set", "train.resolution=32", "--set", "train.log_every=1",
              "--set", "train.image_every=0", "--set", "train.checkpoint_every=0", "--set", "views.image_size=48"]
    assert main(["train", *common, "--out", str(tmp_path / "a"), "--set", "train.steps=4"]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "b"), "--set", "train.steps=2"]) == 0
    _as_written_before(tmp_path / "b", "block_chunk", "block_group")  # options added after the run began
    assert main(["train", *common, "--out", str(tmp_path / "b"), "--set", "train.steps=4", "--resume"]) == 0
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # an option the checkpoint predates reads as its default: set to anything else, the resume is refused
    _as_written_before(tmp_path / "b", "block_group")
    assert main(["train", *common, "--out", str(tmp_path / "b"), "--set", "train.steps=5", "--resume",
                 "--set", "model.block_group=2"]) != 0
    err = capsys.readouterr().err
    assert "cannot resume, the model config differs at 'block_group' (checkpoint 0, now 2)" in err


def _as_written_before(run, *keys):
    """Drop model-config keys from a run's checkpoint.json, as a version before those options wrote it."""
    path = run / "checkpoint" / "checkpoint.json"
    data = json.loads(path.read_text())
    for key in keys:
        del data["meta"]["model_config"][key]
    path.write_text(json.dumps(data))
