"""benchmarks/bench_train_step.py in-process on tiny settings (CPU): every mode, the JSON fields and the ratios
against frustum, OOM reported as a result (a forced fake OOM), the profiler, inference, merging and plotting."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from focusing.models.vae import FocusingVAE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(tmp_path, *extra, names="fandisk", device="cpu"):
    return ["--quick", "--device", device, "--names", names, "--resolutions", "32", "--steps", "1", "--warmup", "0",
            "--image", "32", "--meshes", str(ROOT / "tests" / "data"), "--json", str(tmp_path / "out.json"),
            "--threads", "1", *extra]


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    results = bench.main(tiny_args(tmp, "--inference-resolutions", "32", "--inference-names",
                                   "balloon_whisk,balloon_whisk_x16"))
    return results, tmp


def test_every_mode_reports_counts_phases_and_ratios(bench, quick):
    results, tmp = quick
    assert json.loads((tmp / "out.json").read_text()) == json.loads(json.dumps(results))
    assert results["weights"].startswith("random")
    rows = {r["mode"]: r for r in results["train"]}
    assert list(rows) == list(bench.MODES)
    for mode, r in rows.items():
        assert r["status"] == "ok", r
        assert r["encoded"] > 0 and 0 < r["decoded"] <= r["encoded"] and r["mid"] > r["decoded"], r
        assert r["full"] > r["mid"] and r["triangles"] > 0 and r["ms"] > 0 and r["steps"] == 1
        assert r["peak_gib"] is None  # CPU
        assert set(r["phases_ms"]) == set(bench.PHASES)
        for phase in ("pointnet", "encoder", "decoder", "upsample", "head", "extract", "render_gt", "render_pred",
                      "losses", "backward"):
            assert r["phases_ms"][phase] > 0, (mode, phase)
        assert sum(r["phases_ms"].values()) <= r["ms"] * 1.05
        assert (r["phases_ms"]["carve_depth"] > 0) == (mode not in ("none", "frustum")), mode
        ref = rows["frustum"]
        for key in ("decoded", "mid", "full", "triangles", "ms"):
            assert r["vs_frustum"][key] == pytest.approx(r[key] / ref[key]), (mode, key)
        assert r["vs_frustum"]["peak_gib"] is None
    assert rows["frustum"]["vs_frustum"]["decoded"] == 1.0
    assert rows["carve+zoom"]["vs_same_view"]["decoded"] == pytest.approx(
        rows["carve+zoom"]["decoded"] / rows["frustum+zoom"]["decoded"])
    # the same camera per step in every mode: the carved set is the same wherever it is computed, the zoom too
    assert rows["carve"]["carved"] == rows["frustum+zoom"]["carved"] == rows["carve+zoom"]["carved"]
    assert rows["none"]["carved"] is None and rows["frustum"]["carved"] is None
    assert rows["frustum+zoom"]["zoomed_steps"] == rows["carve+zoom"]["zoomed_steps"] == 1
    assert rows["none"]["decoded"] == rows["none"]["encoded"]
    assert rows["carve+zoom"]["decoded"] <= rows["carve"]["decoded"] <= rows["none"]["decoded"]


def test_profiled_step_prints_top_entries_and_writes_a_trace(bench, tmp_path, capsys):
    results = bench.main(tiny_args(tmp_path, "--no-inference", "--modes", "carve+zoom", "--profile", "--profile-top",
                                   "5", "--trace", str(tmp_path / "trace.json")))
    (row,) = results["train"]
    assert len(row["profile"]) == 5 and row["profile"][0]["cpu_ms"] > 0
    assert "phase:" in capsys.readouterr().out  # the phases are profiler ranges
    trace = json.loads((tmp_path / "trace_tiny_fandisk_32_carve_zoom.json").read_text())
    assert any(e.get("name") == "phase:encoder" for e in trace["traceEvents"])


def test_inference_on_a_mesh_and_its_subdivision(quick):
    results, _ = quick
    rows = {r["mesh"]: r for r in results["inference"]}
    assert set(rows) == {"balloon_whisk", "balloon_whisk_x16"}
    for r in rows.values():
        assert r["status"] == "ok" and r["seconds"] > 0 and r["faces"] > 0 and r["latent"] > 0, r
        assert {"pointnet", "encoder", "decoder", "upsample", "head", "extract"} <= set(r["phases_ms"])
    assert rows["balloon_whisk_x16"]["input_faces"] == 16 * rows["balloon_whisk"]["input_faces"]


def test_merge_prints_and_skips_the_plot_without_matplotlib(bench, quick, monkeypatch, capsys, tmp_path):
    results, tmp = quick
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    merged = bench.main(["--merge", str(tmp / "out.json"), str(tmp / "out.json"), "--plot", str(tmp_path / "m.png"),
                         "--json", str(tmp_path / "merged.json")])
    assert len(merged["train"]) == 2 * len(results["train"])
    assert not (tmp_path / "m.png").exists()
    out = capsys.readouterr()
    assert "matplotlib is not importable" in out.err and "| carve+zoom |" in out.out
    assert json.loads((tmp_path / "merged.json").read_text())["merged_from"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot_written_with_matplotlib(bench, quick, tmp_path):
    assert bench.plot(quick[0], tmp_path / "m.png") and (tmp_path / "m.png").stat().st_size > 0


def test_out_of_memory_is_a_result_and_the_run_goes_on(bench, monkeypatch, tmp_path):
    """A fake OOM whenever more than 140 latent voxels are decoded (fandisk at 32: 164 unzoomed, ~100 zoomed)."""
    decode = FocusingVAE.decode

    def limited(self, z, targets=None):
        if len(z) > 140:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return decode(self, z, targets)

    monkeypatch.setattr(FocusingVAE, "decode", limited)
    results = bench.main(tiny_args(tmp_path, "--no-inference", "--checkpointing", "all", "--pointnet-chunk", "1000"))
    rows = {r["mode"]: r for r in results["train"]}
    assert list(rows) == list(bench.MODES)
    for mode in ("none", "frustum", "carve"):
        assert rows[mode]["status"] == "oom" and "fake" in rows[mode]["error"]
    for mode in ("frustum+zoom", "carve+zoom"):
        assert rows[mode]["status"] == "ok" and rows[mode]["decoded"] <= 140
        assert rows[mode]["checkpointing"] == "all"
        assert all(v is None for v in rows[mode]["vs_frustum"].values())  # the reference ran out of memory
    assert rows["carve+zoom"]["vs_same_view"]["decoded"] == pytest.approx(
        rows["carve+zoom"]["decoded"] / rows["frustum+zoom"]["decoded"])
    table = bench.train_table(results["train"])
    assert table.count("| OOM |") == 3


def test_checkpointing_variants_set_the_config(bench):
    all_ = bench.experiment("S", "all", None, pointnet_chunk=1000, block_chunk=500, block_group=3, offload=True).model
    assert (all_.use_checkpoint, all_.pointnet_chunk, all_.block_chunk, all_.block_group, all_.block_offload) == (
        True, 1000, 500, 3, True)
    blocks = bench.experiment("S", "blocks", None, block_group=3, offload=True).model
    assert (blocks.use_checkpoint, blocks.pointnet_chunk, blocks.block_chunk, blocks.block_group,
            blocks.block_offload) == (True, 0, 0, 0, False)
    pointnet = bench.experiment("S", "pointnet", None, pointnet_chunk=1000, block_chunk=500, block_group=3).model
    assert (pointnet.use_checkpoint, pointnet.pointnet_chunk, pointnet.block_chunk, pointnet.block_group) == (
        False, 1000, 0, 0)


def test_max_minutes_marks_cases_not_run(bench, tmp_path):
    results = bench.main(tiny_args(tmp_path, "--max-minutes", "0", "--inference-resolutions", "32"))
    assert {r["status"] for r in results["train"] + results["inference"]} == {"not run"}


@pytest.mark.gpu
def test_cuda_quick_case(bench, tmp_path):
    """On CUDA: the trainer's CUDA generator draws the cameras, peak memory is reported per case."""
    results = bench.main(tiny_args(tmp_path, "--no-inference", device="cuda"))
    for r in results["train"]:
        assert r["status"] == "ok" and r["peak_gib"] > 0 and r["base_gib"] is not None
        assert r["vs_frustum"]["peak_gib"] is not None


def test_checkpoint_adds_inference_with_trained_weights(bench, tmp_path):
    """--checkpoint: inference rows with the shipped weights (trained output sizes); --configs '' runs no
    random-weight model."""
    from focusing.inference import SHIPPED

    results = bench.main(tiny_args(tmp_path, "--configs", "", "--checkpoint", str(SHIPPED), "--inference-resolutions",
                                   "32", "--inference-names", "fandisk"))
    assert results["train"] == [] and "trained" in results["weights"]
    (row,) = results["inference"]
    assert row["config"] == f"{SHIPPED.name} (trained)" and row["status"] == "ok", row
    assert row["latent"] > 0 and row["faces"] > 0 and row["seconds"] > 0


def test_op_counter_tells_host_syncs_from_other_ops(bench):
    timer = bench.PhaseTimer(torch.device("cpu"))
    counter = bench.OpCounter(timer)
    x = torch.tensor([0.0, 2.0, -1.0, 3.0])
    reps = torch.tensor([1, 0, 2, 1])
    with counter:
        y = x + 1  # 1 op, no sync
        with timer.phase("encoder"):
            x.nonzero()  # sync
            x[x > 0]  # gt + boolean indexing (sync)
            x[torch.tensor([0, 3])]  # integer indexing: no sync
            float(x.sum())  # sum + item (sync)
            torch.repeat_interleave(x, reps)  # sync: the output size is read on the host
            torch.repeat_interleave(x, reps, output_size=4)  # no sync
            y[x > 0] = 0.0  # gt + boolean index_put (sync)
    assert counter.syncs == {"encoder": 5}
    assert counter.ops["other"] == 1 and counter.ops["encoder"] >= 10
    sites = {(site.split(":")[0], op) for site, op in counter.sites}
    assert sites == {("?", op) for op in ("aten::nonzero", "aten::index", "aten::_local_scalar_dense",
                                           "aten::repeat_interleave", "aten::index_put_")}  # not called in focusing/


def test_counted_step_reports_ops_and_syncs_per_phase_with_sites(bench, tmp_path, capsys):
    results = bench.main(tiny_args(tmp_path, "--no-inference", "--modes", "carve+zoom", "--count-ops"))
    (row,) = results["train"]
    ops = row["ops"]
    assert set(ops["phases"]) == set(bench.PHASES)
    assert ops["ops"] == sum(p["ops"] for p in ops["phases"].values()) and ops["syncs"] > 0
    for phase in ("pointnet", "encoder", "decoder", "upsample", "extract", "render_pred", "backward"):
        assert ops["phases"][phase]["ops"] > 0, phase
    sites = [s for s in ops["sync_sites"] if s["site"] != "autograd"]
    assert sites and all(s["site"].startswith("focusing/") for s in sites)
    assert "host syncs" in capsys.readouterr().out
