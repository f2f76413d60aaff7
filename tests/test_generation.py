"""The image-to-3D generator on CPU at tiny sizes: the three models learn on a few shapes, the DiTs keep batch
items apart, `focusing train` runs the generator kinds, `focusing generate` runs end to end with tiny random
weights (written with the trainer's checkpoint and export functions), and bad inputs fail with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from focusing.cli import main
from focusing.errors import FocusingError
from focusing.flow import SamplerConfig, guided_velocity
from focusing.models.dit import (
    DiTConfig, LatentFlow, LatentFlowConfig, StructureFlow, StructureFlowConfig,
)
from focusing.models.image_encoder import ImageEncoderConfig, build_image_encoder
from focusing.models.structure_vae import StructureVAE, StructureVAEConfig, occupancy_grid, occupied_coords
from focusing.models.vae import FocusingVAE, VAEConfig
from focusing.sparse.tensor import SparseTensor
from focusing.train.checkpoint import export_weights, save_checkpoint
from focusing.train.config import from_dict, load_yaml, to_dict
from focusing.train.experiment import load_experiment
from focusing.train.generation import (
    ConditionConfig, ConditionViews, LatentFlowObjective, StructureFlowObjective, StructureLossConfig,
    StructureVAEObjective, condition_cameras, condition_images, mesh_seed, render_condition,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SHAPES = ("balloon_whisk.ply", "idler_riser.ply", "stone_tomb_01.glb")
IMAGE = ImageEncoderConfig(image_size=32, channels=32, patch_size=8, blocks=1, heads=2)
DIT = DiTConfig(channels=32, blocks=2, head_channels=16, window_size=4)
SVAE = StructureVAEConfig(resolution=16, channels=(8, 16, 32), num_res_blocks=1, middle_blocks=1)


def tiny_shape_vae_config() -> VAEConfig:
    return from_dict(VAEConfig, load_yaml(ROOT / "configs" / "tiny.yaml")["model"])


def write_weights(model: torch.nn.Module, folder: Path) -> Path:
    """A weights folder of `model` as training writes it: a checkpoint, then `export_weights` (fp32)."""
    tensors = {f"model/{k}": v.detach().float().clone() if v.is_floating_point() else v.clone()
               for k, v in model.state_dict().items()}
    meta = {"step": 0, "model_class": type(model).__name__, "model_config": to_dict(model.config)}
    save_checkpoint(folder.parent / f".{folder.name}-checkpoint", tensors, meta)
    export_weights(folder.parent / f".{folder.name}-checkpoint", folder, dtype=torch.float32)
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    for name in SHAPES:
        (folder / name).symlink_to(DATA / name)
    return folder


@pytest.fixture(scope="module")
def batch(shapes):
    from focusing.data.online import make_source

    return make_source(shapes, resolution=64, points=2000, batch_size=3, seed=0).next_batch()


def _train(model, objective, batch, steps, lr=3e-3):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        result = objective(model, batch, step=step, generator=g, want_images=False)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        losses.append(float(result.loss.detach()))
    return losses


def _mean(xs):
    return sum(xs) / len(xs)


def _held_loss(model, objective, batch, draws=4):
    """The objective's mean loss over a fixed set of random draws (times, noise, views), without training."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return _mean([float(objective(model, batch, step=0, generator=g).loss) for _ in range(draws)])


# ---- models -----------------------------------------------------------------------------------------------------

def test_occupancy_roundtrip_and_structure_vae_shapes():
    coords = torch.tensor([[0, 1, 2, 3], [0, 15, 0, 7], [1, 4, 4, 4]], dtype=torch.int32)
    grid = occupancy_grid(coords, 2, 16)
    assert grid.shape == (2, 1, 16, 16, 16) and grid.sum() == 3
    assert torch.equal(occupied_coords(grid * 2 - 1), coords)
    vae = StructureVAE(SVAE)
    post = vae.encode(grid)
    assert post.mean.shape == (2, 8, 4, 4, 4) and SVAE.latent_resolution == 4
    assert vae.decode(post.mean).shape == (2, 1, 16, 16, 16)
    assert StructureVAEConfig().latent_resolution == 16
    assert StructureVAEConfig(resolution=128, channels=(16, 32, 128, 512)).latent_resolution == 16


def test_dits_start_at_zero_and_keep_items_apart():
    torch.manual_seed(0)
    lf = LatentFlow(LatentFlowConfig(dit=DIT, image=IMAGE))
    coords = torch.tensor([[0, 1, 1, 1], [0, 1, 2, 3], [0, 6, 1, 0], [1, 0, 0, 0], [1, 5, 5, 5]], dtype=torch.int32)
    z = SparseTensor(coords, torch.randn(5, 8), batch_size=2)
    t, cond = torch.rand(2), torch.randn(2, 16, 32)
    assert torch.equal(lf(z, t, cond).feats, torch.zeros(5, 8))  # adaLN-Zero and a zero output layer
    with torch.no_grad():
        for p in lf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = lf(z, t, cond).feats
    cond2 = cond.clone()
    cond2[1] += 1.0
    t2 = t.clone()
    t2[1] = 0.9
    out2 = lf(z, t2, cond2).feats
    assert torch.allclose(out[:3], out2[:3], atol=1e-6)  # item 0 ignores item 1's time and condition
    assert not torch.allclose(out[3:], out2[3:], atol=1e-4)
    # CFG with weight 1 is the conditional prediction
    predict = lambda f, tt, c: lf(z.replace(f), tt, c).feats  # noqa: E731
    expected = predict(z.feats, torch.full((2,), 0.7), cond)
    assert torch.equal(guided_velocity(predict, z.feats, 0.7, cond, SamplerConfig(cfg=1.0)), expected)

    sf = StructureFlow(StructureFlowConfig(resolution=4, dit=DIT, image=IMAGE))
    with torch.no_grad():
        for p in sf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 8, 4, 4, 4)
    y = sf(x, t, cond)
    x2 = x.clone()
    x2[0, :, 3, 3, 3] += 1.0
    y2 = sf(x2, t, cond)
    assert y.shape == x.shape
    assert (y2[0] - y[0]).abs().amax(0).gt(1e-6).all()  # global attention: one cell changes every cell
    assert torch.allclose(y2[1], y[1], atol=1e-6)


def test_dinov2_without_transformers_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(FocusingError) as err:
        build_image_encoder(ImageEncoderConfig(kind="dinov2", image_size=518, weights=str(tmp_path)))
    message = str(err.value)
    assert "\n" not in message and "transformers" in message and "focusing[dinov2]" in message


def test_dinov2_config_through_train_is_one_line(monkeypatch, tmp_path, capsys, shapes):
    monkeypatch.setitem(sys.modules, "transformers", None)
    vae = write_weights(StructureVAE(SVAE), tmp_path / "svae")
    code = main(["train", "--config", str(ROOT / "configs" / "gen-structure-flow-tiny.yaml"), "--out",
                 str(tmp_path / "run"), "--quiet", "--device", "cpu", "--set", f"structure_vae={vae}",
                 "--set", "model.image.kind=dinov2", "--set", f"data.source={shapes}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "focusing[dinov2]" in err[0]


def test_condition_images_are_normal_renders(batch):
    g = torch.Generator().manual_seed(0)
    images = condition_images(batch["vertices"], batch["faces"], ConditionConfig(image_size=32), g)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    background = (images == 1).all(1)
    assert background.float().mean() > 0.2 and (~background).float().mean() > 0.05
    again = condition_images(batch["vertices"], batch["faces"], ConditionConfig(image_size=32),
                             torch.Generator().manual_seed(0))
    assert torch.equal(images, again)


def test_fixed_condition_views_are_a_meshs_own_renders(batch, monkeypatch):
    """views = V: each item's image is one of its mesh's V views, which are the fresh renders of the cameras seeded
    by the mesh id (one batched render call a mesh, at its first use only); another instance (a resumed run,
    another rank) holds the same views; views = 0 is the fresh random view of `condition_images`."""
    import focusing.train.generation as generation

    cfg = ConditionConfig(image_size=32, views=4)
    calls = []
    render = generation.render_views
    monkeypatch.setattr(generation, "render_views", lambda *a: calls.append(len(a[2].view)) or render(*a))
    views = ConditionViews(cfg)
    g = torch.Generator().manual_seed(5)
    drawn = [views(batch, g) for _ in range(6)]
    assert calls == [4, 4, 4] and set(views.cache) == set(batch["ids"])
    for b, mesh_id in enumerate(batch["ids"]):
        kept = views.cache[mesh_id]
        assert kept.dtype == torch.uint8 and kept.shape == (4, 3, 32, 32) and not torch.equal(kept[0], kept[1])
        cams = condition_cameras(4, cfg, torch.Generator().manual_seed(mesh_seed(mesh_id)))
        for k, cam in enumerate(cams):
            assert torch.equal(kept[k].float() / 255, render_condition(batch["vertices"][b], batch["faces"][b], cam))
        assert len({int((kept.float() / 255 == d[b]).all((1, 2, 3)).nonzero()) for d in drawn}) > 1
    del calls[:]
    other = ConditionViews(cfg)
    assert torch.equal(other(batch, torch.Generator().manual_seed(5)), drawn[0]) and calls == [4, 4, 4]
    fresh = ConditionViews(ConditionConfig(image_size=32))(batch, torch.Generator().manual_seed(0))
    assert torch.equal(fresh, condition_images(batch["vertices"], batch["faces"], ConditionConfig(image_size=32),
                                               torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="views"):
        ConditionConfig(views=-1)


# ---- each model learns on a few shapes --------------------------------------------------------------------------

def test_structure_vae_loss_falls(batch):
    losses = _train(StructureVAE(SVAE), StructureVAEObjective(StructureLossConfig(bce=1.0)), batch, 30)
    assert _mean(losses[-5:]) < 0.6 * _mean(losses[:5]), losses


def test_structure_flow_loss_falls(batch):
    torch.manual_seed(1)
    objective = StructureFlowObjective(from_dict_flow(), ConditionConfig(image_size=32), StructureVAE(SVAE))
    model = StructureFlow(StructureFlowConfig(resolution=4, dit=DIT, image=IMAGE))
    before = _held_loss(model, objective, batch)
    _train(model, objective, batch, 40, lr=5e-3)
    assert bool(model.calibrated)
    after = _held_loss(model, objective, batch)
    assert after < 0.85 * before, (before, after)  # an untrained model stays at `before` exactly


def test_latent_flow_loss_falls(batch):
    torch.manual_seed(2)
    objective = LatentFlowObjective(from_dict_flow(), ConditionConfig(image_size=32),
                                    FocusingVAE(tiny_shape_vae_config()))
    model = LatentFlow(LatentFlowConfig(dit=DIT, image=IMAGE))
    before = _held_loss(model, objective, batch)
    _train(model, objective, batch, 30, lr=5e-3)
    after = _held_loss(model, objective, batch)
    assert after < 0.85 * before, (before, after)


def test_latent_cache_encodes_each_mesh_once_from_the_mesh_alone(shapes, batch):
    """With cache_points a mesh is encoded once, alone, from points seeded by its id: the latents equal a fresh
    objective's (a resumed run, another rank) and the same mesh's encoded in a batch of one, and the VAE is not
    called again for meshes seen before."""
    from focusing.data.online import make_source

    torch.manual_seed(3)
    vae = FocusingVAE(tiny_shape_vae_config())
    calls = []
    encode = vae.encode
    vae.encode = lambda *a, **k: calls.append(k["batch_size"]) or encode(*a, **k)
    objective = LatentFlowObjective(from_dict_flow(), ConditionConfig(image_size=32), vae, cache_points=2000)
    first = objective.latents(batch)
    assert calls == [1, 1, 1] and first.batch_size == 3
    assert torch.equal(first.coords, batch["voxels_latent"])
    again = objective.latents(batch)
    assert calls == [1, 1, 1] and torch.equal(again.feats, first.feats) and torch.equal(again.coords, first.coords)
    fresh = LatentFlowObjective(from_dict_flow(), ConditionConfig(image_size=32), vae, cache_points=2000)
    assert torch.equal(fresh.latents(batch).feats, first.feats)
    singles = make_source(shapes, resolution=64, points=500, batch_size=1, seed=7)
    for _ in range(3):
        one = singles.next_batch()
        b = batch["ids"].index(one["ids"][0])
        assert torch.equal(fresh.latents(one).feats, first.feats[first.coords[:, 0] == b])
    uncached = LatentFlowObjective(from_dict_flow(), ConditionConfig(image_size=32), vae).latents(batch)
    assert torch.equal(uncached.coords, first.coords)
    assert not torch.allclose(uncached.feats, first.feats)  # the batch's own 2000 points, another sample


def test_latent_cache_needs_fixed_poses(tmp_path):
    from focusing.data.online import AugmentConfig

    cfg = load_experiment(ROOT / "configs" / "gen-demo-latent-flow.yaml")
    assert cfg.cache_latents is True and cfg.data.augment is None
    cfg.data.augment = AugmentConfig()
    with pytest.raises(FocusingError, match="cache_latents needs data.augment: null"):
        cfg.build_objective()
    cfg = load_experiment(ROOT / "configs" / "gen-demo-latent-flow.yaml", ["cache_latents=false"])
    assert cfg.cache_latents is False


def test_generator_batches_carry_points_only_where_read(shapes):
    """The structure models and the cached latent flow read only voxels: their batches carry no surface samples
    (the latent flow's 200K a mesh were ~45% of a batch's build) and otherwise the same batch, sample for sample;
    without the cache the latent flow gets its data.points."""
    from focusing.data.online import make_source

    def first_batch(name, *overrides):
        cfg = load_experiment(ROOT / "configs" / f"gen-{name}-tiny.yaml", [f"data.source={shapes}", *overrides])
        return cfg, cfg.build_source(64, 0, 1, "cpu").next_batch()

    for name in ("structure-vae", "structure-flow", "latent-flow"):
        cfg, batch = first_batch(name)
        assert batch["points"].shape == (0, 3) and batch["normals"].shape == (0, 3)
        full = make_source(shapes, resolution=64, points=500, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                           reuse=cfg.data.reuse, latent_only=True).next_batch()
        assert batch["ids"] == full["ids"] and torch.equal(batch["voxels_latent"], full["voxels_latent"])
    cfg, batch = first_batch("latent-flow", "cache_latents=false")
    assert len(batch["points"]) == cfg.data.points * cfg.train.batch_size


def from_dict_flow():
    from focusing.flow import FlowConfig

    return FlowConfig()


# ---- commands ---------------------------------------------------------------------------------------------------

def test_train_command_runs_a_generator_kind(tmp_path, shapes):
    from focusing.train.logs import read_metrics

    out = tmp_path / "run"
    code = main(["train", "--config", str(ROOT / "configs" / "gen-structure-vae-tiny.yaml"), "--out", str(out),
                 "--quiet", "--device", "cpu", "--set", "train.steps=4", "--set", "train.log_every=2",
                 "--set", f"data.source={shapes}", "--set", "data.reuse=4"])
    assert code == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4] and "loss/dice" in records[0]
    weights = export_weights(out, tmp_path / "weights")
    from focusing.image_to_3d import load_structure_vae

    assert load_structure_vae(weights.parent).config.latent_resolution == 4


def test_every_config_loads():
    for name in ("structure-vae", "structure-flow", "latent-flow"):
        for prefix, suffix in (("gen-", ""), ("gen-", "-tiny"), ("gen-demo-", "")):
            cfg = load_experiment(ROOT / "configs" / f"{prefix}{name}{suffix}.yaml")
            assert cfg.kind == name.replace("-", "_")
    assert load_experiment(ROOT / "configs" / "tiny.yaml").kind == "vae"
    big = load_experiment(ROOT / "configs" / "gen-structure-vae.yaml")
    assert big.model.latent_resolution == 16 and big.train.resolution == 4 * big.model.resolution


def test_demo_configs_pair_up_and_fit_the_budgets():
    """The demonstration sizes (benchmarks/gen_demo.py): each export one file of < 16 MiB (what the GPU machine
    sends back), the three together ~6 MB in fp16 (what the repo can ship), the latents of the pairs matching, and
    nothing that needs /work/shared (the GPU machine has none)."""
    import json

    from focusing.image_to_3d import check_latent_pair, check_structure_pair
    from focusing.models.vae import count_parameters

    cfgs = {n: load_experiment(ROOT / "configs" / f"gen-demo-{n}.yaml")
            for n in ("structure-vae", "structure-flow", "latent-flow")}
    counts = {n: count_parameters(c.build_model()) for n, c in cfgs.items()}
    assert all(2 * n < 16 * 2**20 for n in counts.values()) and 2 * sum(counts.values()) < 6.5e6, counts
    check_structure_pair(cfgs["structure-vae"].model, cfgs["structure-flow"].model, "demo")
    shape_vae = from_dict(VAEConfig, json.loads((ROOT / cfgs["latent-flow"].shape_vae / "config.json").read_text())
                          ["model"])
    check_latent_pair(shape_vae, cfgs["latent-flow"].model, "demo")
    for cfg in cfgs.values():
        assert cfg.data.exclude == [] and cfg.data.augment is None and cfg.data.source.startswith(".devdata/")
        assert cfg.train.resolution == shape_vae.resolution == 4 * cfgs["structure-vae"].model.resolution


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gen_demo_budget_reserves_later_stages_and_passes_slack_on():
    demo = _script("gen_demo")
    plan = {"a": 1.0, "b": 2.0, "c": 3.0}
    reserve = demo.RESERVE_MINUTES
    assert demo.allowance(plan, "a", 0.0, 6.0 + reserve) == pytest.approx(1.0)
    assert demo.allowance(plan, "b", 0.5, 6.0 + reserve) == pytest.approx(2.5)  # "a" left half a minute
    assert demo.allowance(plan, "c", 4.0, 6.0 + reserve) == pytest.approx(2.0)  # the last takes what is left
    # half the planned total: every stage gets half its plan, not the first one what the others leave
    assert demo.allowance(plan, "a", 0.0, 3.0 + reserve) == pytest.approx(0.5)
    assert demo.allowance(plan, "b", 0.5, 3.0 + reserve) == pytest.approx(1.0)


def test_gen_demo_split_over_calls_needs_the_earlier_exports(tmp_path):
    demo = _script("gen_demo")
    assert demo.stages_needed(["structure-vae", "structure-flow"]) == []
    assert demo.stages_needed(["structure-flow"]) == ["structure-vae"]
    assert demo.stages_needed(["latent-flow", "evaluation"]) == ["structure-vae", "structure-flow"]
    base = ["run", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    for bad in (["--stages", "latent-flow,evaluation"], ["--stages", "evaluation,latent-flow"], ["--stages", "x"]):
        with pytest.raises(SystemExit):
            demo.main(base + bad)
    for stage in ("structure-vae", "structure-flow"):
        (tmp_path / "gen-a" / stage).mkdir(parents=True)
    with pytest.raises(SystemExit, match="gen32"):  # the arguments pass; the packed set is what is missing
        demo.main(base + ["--stages", "latent-flow,evaluation", "--exports", str(tmp_path / "gen-a"),
                          "--train", str(tmp_path / "gen32.safetensors")])
    split = base + ["--stages", "latent-flow,evaluation", "--exports", str(tmp_path / "gen-a"),
                    "--train", str(tmp_path / "gen32.safetensors")]
    for bad in ("latent-flow=" + str(tmp_path / "nowhere"), "evaluation=" + str(tmp_path / "gen-a"), "latent-flow"):
        with pytest.raises(SystemExit, match="2"):  # argparse's usage error
            demo.main(split + ["--init", bad])
    with pytest.raises(SystemExit, match="gen32"):  # a starting point for a training passes
        demo.main(split + ["--init", "latent-flow=" + str(tmp_path / "gen-a" / "structure-flow")])
    for bad in ("latent-flow=0", "latent-flow=x", "nothing=2", "latent-flow"):
        with pytest.raises(SystemExit, match="2"):
            demo.main(split + ["--plan", bad])
    with pytest.raises(SystemExit, match="gen32"):  # a stage's own plan passes
        demo.main(split + ["--plan", "latent-flow=5.5", "--plan", "evaluation=1"])


def test_gen_demo_training_set_selection(tmp_path):
    demo = _script("gen_demo")
    base, held = tmp_path / "base", tmp_path / "held"
    base.mkdir(), held.mkdir()
    for i in range(60):
        (base / f"m{i:03d}.glb").touch()
    (base / "notes.txt").touch()
    for name in ("m001.ply", "MANIFEST.tsv"):
        (held / name).touch()
    picked = [p.name for p in demo.training_meshes(base, held)]
    assert picked == ["m000.glb", "m029.glb", "m057.glb"]  # every 28th of the 59 not held out
    assert [p.name for p in demo.heldout_meshes(held, 8)] == ["m001.ply"]


def test_gen_demo_packs_what_comes_back(tmp_path):
    demo = _script("gen_demo")
    work, out = tmp_path / "work", tmp_path / "out"
    for stage in demo.TRAININGS:
        (work / "generator" / stage).mkdir(parents=True)
        (work / "generator" / stage / "weights.safetensors").write_bytes(b"0" * 1000)
        (work / "runs" / stage).mkdir(parents=True)
        (work / "runs" / stage / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0, "step_time": 0.5}\n')
    (work / "logs").mkdir()
    (work / "logs" / "structure-vae.log").write_text("stopped at step 10\n")
    (work / "bench").mkdir()
    (work / "bench" / "generation.json").write_text("{}")
    summary = {"stages": {"structure-vae": {"status": "ok", **demo.run_summary(work / "runs" / "structure-vae")}}}
    demo.pack_outputs(work, out, summary)
    assert sorted(p.name for p in out.iterdir()) == ["gen-demo.json", "generation.json", "generator.tar"]
    import tarfile

    with tarfile.open(out / "generator.tar") as tar:
        names = set(tar.getnames())
    assert {"structure-vae/weights.safetensors", "latent-flow/weights.safetensors", "logs/structure-vae.log",
            "runs/structure-flow/metrics.jsonl"} <= names
    row = summary["stages"]["structure-vae"]
    assert row["steps"] is None and row["last_loss"] == 1.0 and row["median_step_s"] == 0.5  # no checkpoint here
    assert summary["generator_tar"]["exports"]


@pytest.fixture(scope="module")
def generator_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("generator")
    torch.manual_seed(3)
    svae = StructureVAE(SVAE)
    with torch.no_grad():
        svae.decoder_out[-1].bias.fill_(1.0)  # a random structure VAE that decodes to a non-empty structure
    write_weights(svae, folder / "structure-vae")
    write_weights(StructureFlow(StructureFlowConfig(resolution=4, dit=DIT, image=IMAGE)), folder / "structure-flow")
    write_weights(LatentFlow(LatentFlowConfig(dit=DIT, image=IMAGE)), folder / "latent-flow")
    write_weights(FocusingVAE(tiny_shape_vae_config()), folder / "shape-vae")
    return folder


@pytest.fixture(scope="module")
def condition_png(tmp_path_factory, batch) -> Path:
    from focusing.render.images import save_png

    image = condition_images(batch["vertices"][:1], batch["faces"][:1], ConditionConfig(image_size=48),
                             torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("image") / "view.png"
    save_png((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), path)
    return path


def test_generate_end_to_end(generator_folder, condition_png, tmp_path, capsys):
    from focusing.io import load_mesh

    out = tmp_path / "mesh.ply"
    code = main(["generate", str(condition_png), "-o", str(out), "--checkpoint", str(generator_folder),
                 "--steps", "2", "--device", "cpu", "--quiet", "--seed", "1"])
    assert code == 0, capsys.readouterr().err
    mesh = load_mesh(out)
    assert len(mesh.faces) > 0 and abs(mesh.vertices).max() <= 0.5 + 1e-3
    assert "wrote" in capsys.readouterr().out


def test_generate_is_deterministic_under_a_seed(generator_folder, condition_png):
    from focusing.image_to_3d import generate, load_generator, load_image

    gen = load_generator(generator_folder)
    image = load_image(condition_png)
    sampler = SamplerConfig(steps=2)
    a, b = (generate(gen, image, seed=5, structure_sampler=sampler, latent_sampler=sampler) for _ in range(2))
    c = generate(gen, image, seed=6, structure_sampler=sampler, latent_sampler=sampler)
    assert (a.vertices == b.vertices).all() and (a.faces == b.faces).all()
    assert a.vertices.shape != c.vertices.shape or not (a.vertices == c.vertices).all()


@pytest.mark.parametrize("content", [b"not an image at all", None])
def test_generate_bad_image_is_one_line(tmp_path, capsys, generator_folder, content):
    path = tmp_path / "input.png"
    if content is not None:
        path.write_bytes(content)
    code = main(["generate", str(path), "-o", str(tmp_path / "out.ply"), "--checkpoint", str(generator_folder),
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(path) in err[0]
    assert ("not a readable image" if content else "no such image file") in err[0]
    assert not (tmp_path / "out.ply").exists()


def test_generate_bad_checkpoint_and_output(tmp_path, capsys, condition_png):
    (tmp_path / "half").mkdir()
    code = main(["generate", str(condition_png), "-o", str(tmp_path / "o.ply"), "--checkpoint",
                 str(tmp_path / "half"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "structure-vae/" in err[0]
    assert main(["generate", str(condition_png), "-o", str(tmp_path / "o.xyz"), "--quiet"]) == 2


def test_the_generator_folders_sampler_json_sets_the_sampler_and_the_cli_overrides_it(
        generator_folder, condition_png, tmp_path, capsys, monkeypatch):
    """`sampler.json` in a generator folder: load_generator reads it, generate samples with it unless given a
    sampler, `focusing generate` uses it for what the command line leaves out; a bad file is one clear line."""
    import json
    import shutil

    import focusing.image_to_3d as image_to_3d

    folder = tmp_path / "gen"
    shutil.copytree(generator_folder, folder)
    assert image_to_3d.load_generator(folder).sampler == SamplerConfig()  # no file: the defaults
    (folder / "sampler.json").write_text(json.dumps({"cfg": 2.5, "steps": 2}))
    gen = image_to_3d.load_generator(folder)
    assert gen.sampler == SamplerConfig(cfg=2.5, steps=2)
    assert image_to_3d.sampler_for(gen, cfg=None, steps=3) == SamplerConfig(cfg=2.5, steps=3)

    used = []
    plain = image_to_3d.euler_sample
    monkeypatch.setattr(image_to_3d, "euler_sample", lambda *a, **k: used.append(a[3]) or plain(*a, **k))
    image_to_3d.generate(gen, image_to_3d.load_image(condition_png), seed=0)
    assert used == [SamplerConfig(cfg=2.5, steps=2)] * 2
    for extra, want in (([], SamplerConfig(cfg=2.5, steps=2)), (["--cfg", "4"], SamplerConfig(cfg=4.0, steps=2))):
        used.clear()
        assert main(["generate", str(condition_png), "-o", str(tmp_path / "o.ply"), "--checkpoint", str(folder),
                     "--device", "cpu", "--quiet", *extra]) == 0
        assert used == [want] * 2
    for bad in ("{not json", json.dumps({"cfg": 2.5, "guidance": 3}), json.dumps({"steps": 0})):
        (folder / "sampler.json").write_text(bad)
        assert main(["generate", str(condition_png), "-o", str(tmp_path / "p.ply"), "--checkpoint", str(folder),
                     "--device", "cpu", "--quiet"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sampler.json" in err[0], err
    assert not (tmp_path / "p.ply").exists()


def test_bench_generation_budget_stops_before_a_mesh(generator_folder, tmp_path, capsys):
    bench = _script("bench_generation")
    result = bench.main(["--checkpoint", str(generator_folder), "--train", str(DATA), "--train-count", "2",
                         "--out", str(tmp_path), "--device", "cpu", "--max-minutes", "0"])
    assert result["summary"]["train"] == {"meshes": 0, "not_run": 2, "mean_fscore": 0.0, "at_least_0.8": 0}
    assert (tmp_path / "generation.json").is_file() and not (tmp_path / "grid-train.png").exists()
    assert "2 of 2 meshes not run" in capsys.readouterr().out


def test_bench_generation_scores_what_generate_makes_and_each_stage(generator_folder, tmp_path):
    from focusing.data.online import MeshFolder
    from focusing.eval.metrics import surface_metrics
    from focusing.image_to_3d import generate, load_generator
    from focusing.train.generation import ConditionConfig, condition_cameras, render_condition

    bench = _script("bench_generation")
    result = bench.main(["--checkpoint", str(generator_folder), "--train", str(DATA), "--train-count", "1",
                         "--out", str(tmp_path), "--device", "cpu", "--steps", "2"])
    row = result["rows"][0]
    assert "error" not in row, row
    # the row's F is the F of what `focusing generate` makes from the same condition view and seed
    mesh = MeshFolder([DATA]).mesh(0)
    cam = condition_cameras(1, ConditionConfig(image_size=256), torch.Generator().manual_seed(1000))[0]
    image = render_condition(torch.as_tensor(mesh.vertices, dtype=torch.float32),
                             torch.as_tensor(mesh.faces, dtype=torch.int64), cam)
    sampler = SamplerConfig(steps=2, cfg=6.0)
    out = generate(load_generator(generator_folder), image, seed=0, structure_sampler=sampler, latent_sampler=sampler)
    assert row["fscore"] == pytest.approx(surface_metrics(out, mesh, normalize=False).fscore)
    for key in bench.STAGES:
        assert (0.0 <= row[key] <= 1.0) if "gain" not in key else (-10.0 < row[key] <= 1.0)
        assert result["summary"]["train"][f"mean_{key}"] == pytest.approx(row[key])
    # one training mesh: it is its own nearest training structure, at the IoU against its own voxels
    assert row["nearest_mesh"] == row["mesh"] and row["nearest_iou"] == pytest.approx(row["structure_iou"])
    assert result["summary"]["train"]["identified"] == 1


def test_bench_generation_identify_only(generator_folder, shapes, tmp_path):
    from focusing.image_to_3d import generate_structure, load_generator
    from focusing.train.generation import ConditionConfig, condition_cameras, render_condition

    bench = _script("bench_generation")
    result = bench.main(["--checkpoint", str(generator_folder), "--train", str(shapes), "--train-count", "3",
                         "--out", str(tmp_path), "--device", "cpu", "--steps", "2", "--identify-only",
                         "--views", "2", "--every", "2"])
    assert (tmp_path / "identification.json").is_file() and not (tmp_path / "generation.json").exists()
    rows = result["rows"]
    names = [r["mesh"] for r in rows]
    assert [r["view"] for r in rows] == [0, 1, 0, 1] and names[0] == names[1] != names[2] == names[3]
    assert result["identified"] == sum(r["nearest_mesh"] == r["mesh"] for r in rows) and result["views"] == 4
    for r in rows:  # the nearest structure is at least as near as the mesh's own
        assert 0.0 <= r["own_iou"] <= r["nearest_iou"] <= 1.0
    # view 1 of mesh 2: what generate_structure makes of that view (seed 1000 + 100 + 2) at the same seed
    gen = load_generator(generator_folder)
    refs = bench.training_structures(gen, str(shapes), 3, 0)
    mesh = bench._collection(str(shapes)).mesh(2)
    cam = condition_cameras(1, ConditionConfig(image_size=256), torch.Generator().manual_seed(1102))[0]
    image = render_condition(torch.as_tensor(mesh.vertices, dtype=torch.float32),
                             torch.as_tensor(mesh.faces, dtype=torch.int64), cam)
    coords = generate_structure(gen, image, torch.Generator().manual_seed(0), SamplerConfig(steps=2, cfg=6.0))
    grid = gen.structure_vae.config.resolution
    assert rows[3]["own_iou"] == pytest.approx(bench._iou(coords, refs[2][1].coords, grid))


def test_bench_generation_condition_gain():
    """0 for a flow that ignores its condition, 1 for one that the condition tells the exact velocity, the
    ratio in between; for dense items and sparse rows alike."""
    from focusing.flow import velocity

    bench = _script("bench_generation")
    cond = torch.ones(1, 3, 4)
    for x0 in (torch.randn(1, 2, 3, 3, 3), torch.randn(7, 5)):
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
        exact = velocity(x0, eps)

        def blind(x, t, c):
            return torch.zeros_like(x)

        def told(x, t, c):
            return exact if bool(c.any()) else torch.zeros_like(x)

        def half(x, t, c):
            return exact * (1 - 0.5 ** 0.5) if bool(c.any()) else torch.zeros_like(x)

        assert bench.condition_gain(blind, x0, cond, seed=4) == pytest.approx(0.0)
        assert bench.condition_gain(told, x0, cond, seed=4) == pytest.approx(1.0)
        assert bench.condition_gain(half, x0, cond, seed=4) == pytest.approx(0.5, abs=1e-5)


def test_bench_generation_nearest_structure():
    bench = _script("bench_generation")
    box = torch.tensor([[0, x, y, z] for x in range(2) for y in range(2) for z in range(2)], dtype=torch.int32)
    bar = torch.tensor([[0, 3, 3, z] for z in range(4)], dtype=torch.int32)
    refs = [(name, SparseTensor(c, torch.zeros(len(c), 8), batch_size=1, resolution=4))
            for name, c in (("box.glb", box), ("bar.glb", bar))]
    assert bench.nearest_structure(box[:6], refs, 4) == {"nearest_mesh": "box.glb", "nearest_iou": 0.75}
    assert bench.nearest_structure(torch.cat([bar, box[:1]]), refs, 4) == {"nearest_mesh": "bar.glb",
                                                                          "nearest_iou": pytest.approx(0.8)}
    summary = bench.summarize([{"set": "train", "mesh": "box.glb", "fscore": 0.5, "nearest_mesh": "bar.glb"},
                               {"set": "train", "mesh": "bar.glb", "fscore": 0.9, "nearest_mesh": "bar.glb"}],
                              {"train": 0})
    assert summary["train"]["identified"] == 1


def test_bench_generation_iou():
    bench = _script("bench_generation")
    a = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [0, 3, 3, 3]], dtype=torch.int32)
    assert bench._iou(a, a, 4) == 1.0
    assert bench._iou(a, a[:1], 4) == pytest.approx(1 / 3)
    assert bench._iou(a[:1], a[2:], 4) == 0.0


def test_bench_view_identification(generator_folder, shapes, tmp_path):
    bench = _script("bench_view_identification")
    targets = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pred = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.1, 0.2]])
    assert bench.identified(pred, targets, torch.tensor([1, 0, 2])).tolist() == [True, True, False]
    out = tmp_path / "vi.json"
    assert bench.main(["--config", str(ROOT / "configs" / "gen-structure-flow-tiny.yaml"), "--set",
                       f"structure_vae={generator_folder / 'structure-vae'}", "--set", f"data.source={shapes}",
                       "--count", "3", "--steps", "160", "--batch", "3", "--lr", "3e-3", "--eval-every", "80",
                       "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert len(set(result["meshes"])) == 3
    first, last = result["rows"]
    assert [first["step"], last["step"], last["views"]] == [80, 160, 6]
    assert 0 <= last["identified"] <= 6 and sum(last["per_mesh"]) == last["identified"]
    assert last["eval_mse"] < 0.8 * result["mean_latent_mse"]  # unseen views: it learned more than the mean


def test_the_shipped_generator_pairs_with_the_shipped_shape_vae():
    """The shipped latent flow models the latent space of the focusing-S it was trained on (its model card records
    that export's sha256): a new focusing-S export needs the latent flow trained again."""
    import hashlib
    import re

    from focusing.image_to_3d import SHIPPED
    from focusing.inference import SHIPPED as SHAPE_VAE

    recorded = re.search(r"shape-vae sha256: ([0-9a-f]{64})", (SHIPPED / "README.md").read_text()).group(1)
    assert hashlib.sha256((SHAPE_VAE / "weights.safetensors").read_bytes()).hexdigest() == recorded
    assert (SHIPPED / "shape-vae").resolve() == SHAPE_VAE.resolve()


def test_the_shipped_generator_gives_a_training_mesh_back(tmp_path):
    """`load_generator()` with no folder is the shipped demonstration; on an unseen render of one of its training
    meshes (arrow, the second of tests/data/gen32.safetensors: its 32 training meshes) it gives that mesh back
    (F@0.005 0.964 in benchmarks/results/generation_cpu128_run23_w1.json, with the folder's sampler.json; the
    issue's target is 0.8)."""
    bench = _script("bench_generation")
    result = bench.main(["--train", str(DATA / "gen32.safetensors"), "--train-count", "2",
                         "--out", str(tmp_path), "--device", "cpu", "--no-stages"])
    scores = {row["mesh"]: row["fscore"] for row in result["rows"]}
    assert scores["arrow.glb"] >= 0.8 and 0.3 < scores["180_twist.glb"] < 0.9, scores
