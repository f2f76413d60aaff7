"""`focusing prepare`: cache contents, resume, bad items, sharding, worker processes; the Dataset reads it."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from focusing.cli import main
from focusing.data.dataset import LEVEL_KEYS, ShapeDataset, collate_shapes
from focusing.data.grid import voxel_corners
from focusing.data.prepare import (
    PrepareSettings,
    assign,
    find_items,
    prepare_dataset,
    process_item,
    read_index,
    run_pool,
)
from focusing.data.tsdf import corner_tsdf
from focusing.data.voxelize import voxel_pyramid, with_batch
from focusing.io import load_mesh, normalize

MESHES = ["idler_riser", "featuretype_block", "milk_truck", "lilium_surface", "steel_ladder"]
R = 32
SETTINGS = PrepareSettings(resolution=R, points=2048)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("meshes")
    for name in MESHES:
        shutil.copy(data_dir / f"{name}.ply", folder / f"{name}.ply")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory, inputs):
    out = tmp_path_factory.mktemp("cache")
    report = prepare_dataset([inputs], out, SETTINGS, progress=False)
    assert (report.prepared, report.skipped, report.failed) == (len(MESHES), 0, [])
    return out


def test_items_hold_what_the_modules_compute(cache, inputs):
    entries = read_index(cache)
    assert [e["status"] for e in entries] == ["ok"] * len(MESHES)
    ds = ShapeDataset(cache)
    assert len(ds) == len(MESHES) and ds.resolution == R
    for i, entry in enumerate(entries):
        name = entry["id"].rsplit("-", 1)[0]
        source = inputs / f"{name}.ply"
        assert entry["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        mesh, norm = normalize(load_mesh(source))
        item = ds[i]
        assert item["id"] == entry["id"]
        pyramid = voxel_pyramid(mesh, R)
        for key, level in zip(LEVEL_KEYS, (R // 4, R // 2, R)):
            assert item[key].dtype == torch.int32 and torch.equal(item[key], pyramid[level])
        corners = voxel_corners(with_batch(pyramid[R]))[0][:, 1:]
        assert item["corners"].dtype == torch.int32 and torch.equal(item["corners"], corners)
        assert item["tsdf"].dtype == torch.float32 and item["tsdf"].shape == (len(corners),)
        if name in ("idler_riser", "lilium_surface"):  # closed CAD part, open sheet
            expect = corner_tsdf(mesh, corners, R)
            assert (item["tsdf"] - expect).abs().max() <= 3.0 / R * 2**-10  # float16 storage in voxel units
        assert item["points"].shape == (2048, 3) and item["normals"].shape == (2048, 3)
        assert torch.allclose(item["normals"].norm(dim=1), torch.ones(2048), atol=1e-5)
        assert np.allclose(item["vertices"].numpy(), mesh.vertices, atol=1e-6)
        assert torch.equal(item["faces"], torch.from_numpy(mesh.faces))
        assert np.allclose(item["normalization"].numpy(), [*norm.center, norm.scale])
        assert entry["counts"]["corners"] == len(corners) and entry["resolution"] == R


def test_resume_skips_done_items_and_reports_bad_ones(cache, inputs, tmp_path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    folder = tmp_path / inputs.name  # keys are relative to the input folder (its name included)
    shutil.copytree(inputs, folder)
    (folder / "broken.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 9\nend_header\n\x01")
    before = {p: p.stat().st_mtime_ns for p in out.glob("items/*/*.safetensors")}
    report = prepare_dataset([folder], out, SETTINGS, progress=False)
    assert (report.prepared, report.skipped, len(report.failed)) == (0, len(MESHES), 1)
    assert "broken.ply" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("items/*/*.safetensors")} == before  # untouched
    entries = read_index(out)
    failed = [e for e in entries if e["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["source"].endswith("broken.ply") and "unreadable" in failed[0]["error"]
    assert len(ShapeDataset(out)) == len(MESHES)  # the dataset only serves good items
    # The CLI: exit 0 by default, 1 with --strict; the summary goes to stderr.
    assert main(["prepare", str(folder), "--out", str(out), "--resolution", str(R), "--points", "2048", "--quiet"]) == 0
    assert "skipped 5" in capsys.readouterr().err
    assert (
        main(
            [
                "prepare",
                str(folder),
                "--out",
                str(out),
                "--resolution",
                str(R),
                "--points",
                "2048",
                "--quiet",
                "--strict",
            ]
        )
        == 1
    )
    # Changed settings redo the item (and only that resolution's files are trusted).
    single = folder / "idler_riser.ply"
    report = prepare_dataset([single], out, PrepareSettings(resolution=R, points=1024), progress=False)
    assert (report.prepared, report.skipped) == (1, 0)


def test_partial_temp_files_are_not_items(cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    victim = next(out.glob("items/*/*.safetensors"))
    victim.rename(victim.parent / f".{victim.stem}.x.tmp.safetensors")  # as left by a killed run
    for f in out.glob("index-*.json"):
        f.unlink()
    assert len(read_index(out)) == len(MESHES) - 1  # rebuilt from the item files, temp file ignored


def test_sharding_assigns_every_item_to_exactly_one_rank(cache, inputs, tmp_path):
    items = find_items([inputs, inputs / "milk_truck.ply"])  # the same file twice counts once
    assert len(items) == len(MESHES)
    many = [type(items[0])(f"m{i}", f"set/m{i}.obj", f"/x/m{i}.obj") for i in range(500)]
    for world in (1, 2, 3, 7):
        shards = [assign(many, r, world) for r in range(world)]
        ids = [i.id for shard in shards for i in shard]
        assert sorted(ids) == sorted(i.id for i in many)
        assert min(map(len, shards)) > 0.6 * len(many) / world  # roughly balanced
    assert assign(list(reversed(many)), 1, 3) == list(reversed(assign(many, 1, 3)))  # order-independent
    # Two ranks into one cache: each writes its own index; reading merges them; nothing is done twice.
    out = tmp_path / "sharded"
    small = PrepareSettings(resolution=8, points=64)
    reports = [prepare_dataset([inputs], out, small, rank=r, world_size=2, progress=False) for r in (0, 1)]
    assert sum(r.prepared for r in reports) == len(MESHES) and all(r.prepared for r in reports)
    assert sorted(p.name for p in out.glob("index-*.json")) == [
        "index-00000-of-00002.json",
        "index-00001-of-00002.json",
    ]
    merged = read_index(out)
    assert [e["id"] for e in merged] == [e["id"] for e in read_index(cache)]
    assert all(e["status"] == "ok" for e in merged)


def test_worker_processes(inputs, tmp_path):
    out = tmp_path / "workers"
    two = [inputs / "idler_riser.ply", inputs / "steel_ladder.ply"]
    report = prepare_dataset(two, out, PrepareSettings(resolution=16, points=256), workers=2, progress=False)
    assert (report.prepared, report.failed) == (2, [])
    index = json.loads((out / "index-00000-of-00001.json").read_text())
    assert index["resolution"] == 16 and len(index["items"]) == 2


def _crash_on_ladder(item, out_dir, settings):
    """A worker function that kills its process on one item (as the OOM killer would)."""
    if "steel_ladder" in item.key:
        os._exit(3)
    return process_item(item, out_dir, settings)


def test_a_dying_worker_fails_its_items_and_the_batch_goes_on(inputs, tmp_path):
    items = find_items([inputs])
    out = tmp_path / "crash"
    entries = []
    work = functools.partial(_crash_on_ladder, out_dir=out, settings=PrepareSettings(resolution=8, points=64))
    run_pool(items, work, 1, entries.append)
    assert sorted(e["id"] for e in entries) == sorted(i.id for i in items)  # every item exactly once
    status = {e["key"].split("/")[-1]: e["status"] for e in entries}
    assert status["steel_ladder.ply"] == "failed"
    assert "worker process died" in next(e["error"] for e in entries if "steel_ladder" in e["key"])
    assert list(status.values()).count("ok") >= len(items) - 2  # at most the other item in flight is lost


def test_dataset_subsamples_and_collates(cache):
    ds = ShapeDataset(cache, points=500, seed=1)
    a, b = ds[0], ds[1]
    assert a["points"].shape == (500, 3)
    assert torch.equal(ds[0]["points"], a["points"])  # reproducible
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["points"], a["points"])  # a new subset per epoch
    full = ShapeDataset(cache)[0]["points"]
    assert (a["points"][:, None] == full[None]).all(-1).any(1).all()  # a subset of the stored samples
    batch = collate_shapes([a, b])
    for key in (*LEVEL_KEYS, "corners"):
        assert batch[key].shape == (len(a[key]) + len(b[key]), 4) and batch[key].dtype == torch.int32
        assert torch.equal(batch[key][: len(a[key]), 0], torch.zeros(len(a[key]), dtype=torch.int32))
        assert torch.equal(batch[key][len(a[key]) :, 1:], b[key])
    assert batch["tsdf"].shape == (len(a["corners"]) + len(b["corners"]),)
    assert batch["points"].shape == (2, 500, 3) and batch["resolution"].tolist() == [R, R]
    assert batch["tsdf"].abs().max() <= 3.0 / R + 1e-6  # normalised units


def test_cli_errors(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "missing: no such file or folder" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    assert "no mesh files found" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--resolution", "30"]) == 1
    assert "multiple of 4" in capsys.readouterr().err


@pytest.mark.gpu
def test_prepare_on_cuda_matches_cpu(inputs):
    from focusing.data.prepare import prepare_mesh

    path = inputs / "milk_truck.ply"
    cpu, _ = prepare_mesh(path, PrepareSettings(resolution=64, points=1000))
    gpu, _ = prepare_mesh(path, PrepareSettings(resolution=64, points=1000, device="cuda"))
    for key in cpu:
        if key == "tsdf":
            assert torch.allclose(gpu[key].float(), cpu[key].float(), atol=1e-3)
        else:
            assert torch.equal(gpu[key], cpu[key]), key


def test_items_that_teach_nothing_are_warned_about(tmp_path, capsys, monkeypatch):
    from focusing.data.prepare import PrepareSettings, prepare_dataset, read_index
    from focusing.eval import hard_cases as hc
    from focusing.io import save_mesh

    src = tmp_path / "in"
    src.mkdir()
    save_mesh(hc.sphere(0.4, 2), src / "sphere.ply")
    save_mesh(hc.flat_sheet(9), src / "sheet.ply")  # gets a surface now: no warning
    settings = PrepareSettings(resolution=16, points=20_000)
    report = prepare_dataset([src], tmp_path / "cache", settings, progress=False)
    entries = {e["key"].split("/")[-1]: e for e in read_index(tmp_path / "cache")}
    assert report.warned == 0 and all(e["warnings"] == [] for e in entries.values())
    checks = entries["sphere.ply"]["checks"]
    assert checks["tsdf_negative"] > 0 and checks["tsdf_positive"] > 0
    assert checks["points_outside_16"] == 0 and checks["points_outside_4"] == 0
    assert checks["empty_voxels_16"] < 0.2 * entries["sphere.ply"]["counts"]["voxels_16"]
    # A TSDF with no sign change and points outside the voxels are flagged.
    from focusing.data import prepare as prep

    fake = prep.item_checks(np.zeros((5, 3), np.float32), {4: torch.tensor([[3, 3, 3]], dtype=torch.int32)},
                            torch.ones(8))
    assert fake["points_outside_4"] == 5 and fake["empty_voxels_4"] == 1
    assert [w.split(" ")[1] for w in prep.item_warnings(fake, 5)] == ["TSDF", "sample"]
    # Warnings go to the log and the index; the item is still cached.
    monkeypatch.setattr(prep, "item_warnings", lambda checks, points: ["the TSDF has no sign change"])
    report = prepare_dataset([src], tmp_path / "cache2", settings, progress=False)
    assert report.warned == 2 and report.prepared == 2
    assert capsys.readouterr().err.count("warning: ") == 2
    assert all(e["warnings"] and e["status"] == "ok" for e in read_index(tmp_path / "cache2"))
