"""Online batches (`focusing.data.online`): torch sampling, augmentation, the batch contract, sharding, exact
resume, the prefetch thread, held-out meshes and the prepare-cache adapter."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from focusing.data.corpus import pack_corpus
from focusing.data.distance import point_triangle_distance
from focusing.data.online import (
    AugmentConfig,
    OnlineSource,
    PackedMeshes,
    augment_mesh,
    build_sample,
    make_source,
    random_rotation,
    sample_surface_torch,
)
from focusing.data.prepare import PrepareSettings, prepare_dataset
from focusing.data.sampling import sample_surface
from focusing.errors import FocusingError
from focusing.io import load_mesh, normalize

SMALL = ["idler_riser.ply", "balloon_whisk.ply", "corner_shelf_01.glb", "stone_tomb_01.glb", "featuretype_block.ply",
         "steel_ladder.ply"]
R = 16
BATCH_KEYS = {"ids", "resolution", "points", "normals", "point_batch", "voxels_latent", "voxels_mid", "voxels",
              "vertices", "faces"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("meshes")
    for name in SMALL:
        shutil.copy(data_dir / name, folder / name)
    out = folder.parent / "small.safetensors"
    assert pack_corpus([folder], out).packed == len(SMALL)
    return out


def _source(corpus, **kw):
    options = dict(resolution=R, points=64, batch_size=2, seed=3, augment=AugmentConfig(), prefetch=0)
    return make_source(corpus, **{**options, **kw})


def _distance_to_mesh(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    tri = vertices.double()[faces]  # [F, 3, 3]
    return point_triangle_distance(points.double()[:, None, :], tri[None]).amin(1)


def test_torch_sampling_lies_on_the_surface_and_is_area_uniform(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "corner_shelf_01.glb"))
    v, f = torch.as_tensor(mesh.vertices), torch.as_tensor(mesh.faces)
    n = 100_000
    points, normals, face = sample_surface_torch(v, f, n, torch.Generator().manual_seed(0))
    assert points.dtype == normals.dtype == torch.float32 and points.shape == (n, 3) and face.dtype == torch.int64
    tri = v[f[face]]
    assert point_triangle_distance(points.double(), tri).max() < 1e-7  # on its own face
    cross = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    torch.testing.assert_close(normals.double(), cross / cross.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)
    # Counts per face follow the areas (within 5 sigma of the binomial), like the numpy sampler's.
    area = torch.as_tensor(mesh.face_areas())
    expected = n * area / area.sum()
    sigma = (expected * (1 - area / area.sum())).sqrt()
    for counts in (torch.bincount(face, minlength=len(f)),
                   torch.bincount(torch.as_tensor(sample_surface(mesh, n, seed=0).face_index), minlength=len(f))):
        assert ((counts - expected).abs() <= 5 * sigma + 1).all()
    # Uniform inside each triangle: the mean barycentric coordinates are 1/3 each.
    bary = torch.linalg.lstsq(torch.stack([tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]], 2),
                              (points.double() - tri[:, 0])[..., None]).solution[..., 0]
    torch.testing.assert_close(bary.mean(0), torch.full((2,), 1 / 3, dtype=torch.float64), atol=5e-3, rtol=0)
    again = sample_surface_torch(v, f, n, torch.Generator().manual_seed(0))[0]
    assert torch.equal(points, again)


def test_rotations_are_rotations_and_tilts_are_bounded():
    rng = np.random.default_rng(0)
    up = np.array([0.0, 1.0, 0.0])
    for mode in ("so3", "up"):
        for _ in range(20):
            rot = random_rotation(AugmentConfig(rotation=mode, tilt_deg=10), rng)
            np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
            assert abs(np.linalg.det(rot) - 1) < 1e-12
            if mode == "up":
                assert math.degrees(math.acos(np.clip((rot @ up) @ up, -1, 1))) <= 10 + 1e-9
    z = np.stack([random_rotation(AugmentConfig(), rng)[:, 2] for _ in range(2000)])
    assert np.abs(z.mean(0)).max() < 0.06  # uniform over SO(3): a rotated axis has mean ~0


def test_augmentation_stays_in_the_cube_and_points_on_the_augmented_mesh(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "featuretype_block.ply"))
    for config in (AugmentConfig(), AugmentConfig(rotation="up", scale=(0.5, 2.0), extent=(0.6, 0.9))):
        out = augment_mesh(mesh, config, np.random.default_rng(1))
        lo, hi = out.bounds
        assert lo.min() >= -0.5 - 1e-12 and hi.max() <= 0.5 + 1e-12
        np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-12)
        side = (hi - lo).max()
        assert side == pytest.approx(1.0) if config.extent == (1.0, 1.0) else 0.6 <= side <= 0.9
        assert not np.allclose(out.vertices, mesh.vertices)
    sample = build_sample(mesh, resolution=R, points=300, device=torch.device("cpu"), augment=AugmentConfig(),
                          key=(0, 5))
    assert _distance_to_mesh(sample["points"], sample["vertices"], sample["faces"]).max() < 1e-6
    assert sample["vertices"].abs().max() <= 0.5 + 1e-6


def _keys(coords: torch.Tensor) -> set[tuple]:
    return {tuple(c) for c in coords.tolist()}


def test_batch_contract_pyramid_and_points_in_latent_voxels(corpus):
    source = _source(corpus, batch_size=3, points=500, resolution=32)
    batch = source.next_batch()
    assert set(batch) == BATCH_KEYS and batch["resolution"] == 32 and len(batch["ids"]) == 3
    assert batch["points"].dtype == batch["normals"].dtype == torch.float32 and batch["points"].shape == (1500, 3)
    assert batch["point_batch"].dtype == torch.int64 and torch.equal(batch["point_batch"].bincount(), torch.tensor([500] * 3))
    levels = [batch["voxels_latent"], batch["voxels_mid"], batch["voxels"]]
    for level, r in zip(levels, (8, 16, 32)):
        assert level.dtype == torch.int32 and level.shape[1] == 4
        assert torch.equal(level, torch.unique(level, dim=0))  # sorted (batch, x, y, z), unique
        assert level[:, 1:].min() >= 0 and level[:, 1:].max() < r
    for fine, coarse in zip(levels[1:], levels[:-1]):  # every voxel's parent is active, every parent has a child
        parents = torch.cat([fine[:, :1], fine[:, 1:] // 2], 1)
        assert _keys(parents) == _keys(coarse)
    cells = ((batch["points"].double() + 0.5) * 8).floor().clamp(0, 7).int()
    assert _keys(torch.cat([batch["point_batch"][:, None].int(), cells], 1)) <= _keys(levels[0])
    for b in range(3):  # GT meshes share the points' frame
        assert len(batch["vertices"][b]) and batch["faces"][b].dtype == torch.int64
        pts = batch["points"][batch["point_batch"] == b][:100]
        assert _distance_to_mesh(pts, batch["vertices"][b], batch["faces"][b]).max() < 1e-6


def test_latent_only_batches_hold_the_pyramids_latent_level_alone(corpus):
    full, latent = _source(corpus, resolution=64, augment=None), _source(corpus, resolution=64, augment=None,
                                                                        latent_only=True)
    for _ in range(2):
        a, b = full.next_batch(), latent.next_batch()
        assert set(b) == BATCH_KEYS - {"voxels_mid", "voxels"}
        assert a["ids"] == b["ids"] and torch.equal(a["voxels_latent"], b["voxels_latent"]) and len(b["voxels_latent"])
        assert torch.equal(a["points"], b["points"])
    with pytest.raises(FocusingError, match="latent_only"):
        _source(corpus, latent_only=True, tsdf_truncation=3.0)


def test_samples_of_the_mesh_alone_are_built_once_and_batches_do_not_change(corpus, monkeypatch):
    """Without augmentation and points (the generators' latent voxels), a sample depends on its mesh alone: the
    source builds each mesh once (counted: `build_sample` calls over three epochs) and its batches are those of a
    source that builds every sample anew (the same ids, voxels, meshes), with prefetching too."""
    import focusing.data.online as online

    options = dict(resolution=64, augment=None, points=0, latent_only=True)
    fresh = _source(corpus, **options)
    fresh.fixed_samples = False  # the reference: every sample built at its draw
    reference = [fresh.next_batch() for _ in range(3 * len(SMALL) // 2)]
    calls = []
    build = online.build_sample
    monkeypatch.setattr(online, "build_sample", lambda *a, **k: calls.append(1) or build(*a, **k))
    for prefetch in (0, 2):
        calls.clear()
        kept = _source(corpus, prefetch=prefetch, **options)
        assert kept.fixed_samples
        for expected in reference:
            assert _same(kept.next_batch(), expected)
        kept.close()
        assert len(calls) == len(SMALL)
    assert not _source(corpus, resolution=64, augment=None).fixed_samples  # with points: drawn per key


def test_ranks_are_disjoint_and_cover_each_epoch(corpus):
    world, per_epoch = 3, len(SMALL)
    seen = []
    for rank in range(world):
        source = _source(corpus, batch_size=1, world_size=world, rank=rank, points=8)
        ids = [source.next_batch()["ids"][0] for _ in range(2 * per_epoch // world)]
        seen.append((ids[: per_epoch // world], ids[per_epoch // world:]))
        assert source.state_dict()["epoch"] == 2 and source.state_dict()["sample"] == 0
    for epoch in range(2):
        flat = [i for rank in seen for i in rank[epoch]]
        assert sorted(flat) == sorted(source.ids)  # disjoint and covering
    assert [r[0] for r in seen] != [r[1] for r in seen]  # a new permutation each epoch


def _same(a: dict, b: dict) -> bool:
    return a["ids"] == b["ids"] and set(a) == set(b) and all(
        torch.equal(x, y) for k in set(a) - {"ids", "resolution"}
        for x, y in (zip(a[k], b[k]) if isinstance(a[k], list) else [(a[k], b[k])])
    )


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_dict_resumes_the_identical_batch_sequence(corpus, prefetch):
    unbroken = _source(corpus, reuse=2, prefetch=prefetch)
    reference = [unbroken.next_batch() for _ in range(7)]
    unbroken.close()
    assert _same(reference[0], reference[1]) and not _same(reference[1], reference[2])  # reuse = 2
    first = _source(corpus, reuse=2, prefetch=prefetch)
    for _ in range(3):
        first.next_batch()  # stops in the middle of a reused batch, with batches built ahead
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = _source(corpus, reuse=2, prefetch=prefetch)
    resumed.load_state_dict(state)
    for expected in reference[3:]:
        assert _same(resumed.next_batch(), expected)
    resumed.close()
    with pytest.raises(FocusingError, match="seed"):
        _source(corpus, seed=4).load_state_dict(state)


def test_prefetch_errors_reach_the_trainer(corpus, monkeypatch):
    source = _source(corpus, prefetch=1)
    monkeypatch.setattr(source, "build", lambda start: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        source.next_batch()
    source.close()


def test_held_out_meshes_never_reach_training(tmp_path, corpus, data_dir):
    manifest = tmp_path / "MANIFEST.tsv"
    manifest.write_text("file\tsha256\nballoon_whisk.ply\t0\n")
    held = tmp_path / "held"
    held.mkdir()
    from focusing.io import save_mesh

    save_mesh(load_mesh(data_dir / "stone_tomb_01.glb"), held / "tomb_copy.ply")  # same geometry, new name
    source = _source(corpus, batch_size=1, points=8, exclude=[manifest, held])
    assert len(source) == len(SMALL) - 1 and not any(i.startswith("balloon_whisk") for i in source.ids)
    ids = [source.next_batch()["ids"][0] for _ in range(2 * len(SMALL))]
    assert not any(i.startswith("stone_tomb") for i in ids)  # refused when built, replaced by the next mesh
    assert {i.split("-")[0] for i in ids} == {n.split(".")[0] for n in SMALL} - {"balloon_whisk", "stone_tomb_01"}


def test_folder_source_builds_the_same_batches_as_the_packed_one_up_to_quantisation(tmp_path, data_dir, corpus):
    folder = tmp_path / "meshes"
    folder.mkdir()
    for name in SMALL:
        shutil.copy(data_dir / name, folder / name)
    packed, files = _source(corpus, augment=None).next_batch(), _source(folder, augment=None).next_batch()
    assert [i.rsplit("-", 1)[0] for i in packed["ids"]] == [i.rsplit("-", 1)[0] for i in files["ids"]]
    # The same faces in the same order: points differ by the quantisation, except the few whose face choice
    # flips at a boundary of the (slightly changed) area CDF.
    close = (packed["points"] - files["points"]).abs().amax(1) < 3e-5
    assert close.float().mean() > 0.9


def test_cache_adapter_gives_the_same_keys_and_dtypes(tmp_path, data_dir, corpus):
    meshes = tmp_path / "in"
    meshes.mkdir()
    for name in SMALL[:2]:
        shutil.copy(data_dir / name, meshes / name)
    cache = tmp_path / "cache"
    prepare_dataset([meshes], cache, PrepareSettings(resolution=R, points=300), progress=False)
    stored = make_source(cache, resolution=R, points=100, batch_size=2, seed=0)
    assert stored.use_stored
    batch = stored.next_batch()
    reference = _source(corpus).next_batch()
    assert set(batch) == BATCH_KEYS
    for key in BATCH_KEYS - {"ids", "resolution"}:
        a, b = batch[key], reference[key]
        a, b = (a[0], b[0]) if isinstance(a, list) else (a, b)
        assert a.dtype == b.dtype and a.shape[1:] == b.shape[1:], key
    assert batch["points"].shape == (200, 3)
    mesh, _ = normalize(load_mesh(meshes / f"{batch['ids'][0].rsplit('-', 1)[0]}.ply"))
    from focusing.data.voxelize import voxel_pyramid

    assert torch.equal(batch["voxels"][batch["voxels"][:, 0] == 0, 1:], voxel_pyramid(mesh, R)[R])
    rebuilt = make_source(cache, resolution=R, points=100, batch_size=2, seed=0, augment=AugmentConfig())
    assert not rebuilt.use_stored and set(rebuilt.next_batch()) == BATCH_KEYS


def test_bad_settings_fail_with_one_line(corpus, tmp_path):
    with pytest.raises(FocusingError, match="multiple of 4"):
        _source(corpus, resolution=18)
    with pytest.raises(FocusingError, match="rank"):
        _source(corpus, rank=2, world_size=2)
    with pytest.raises(FocusingError):
        make_source(tmp_path / "missing", resolution=R, points=8, batch_size=1)
    assert isinstance(_source(corpus).collection, PackedMeshes) and isinstance(_source(corpus), OnlineSource)


@pytest.mark.gpu
def test_cuda_prefetch_on_its_own_stream_matches_building_in_place(corpus):
    options = dict(resolution=64, points=20_000, batch_size=2, augment=AugmentConfig(), device="cuda")
    inline = make_source(corpus, prefetch=0, **options)
    ahead = make_source(corpus, prefetch=2, **options)
    for _ in range(4):
        expected, got = inline.next_batch(), ahead.next_batch()
        torch.cuda.current_stream().synchronize()
        assert got["points"].is_cuda and _same(got, expected)
    ahead.close()


def test_batches_carry_the_corner_tsdf_for_the_warm_up(data_dir, monkeypatch):
    """With tsdf_truncation, a batch holds the corners of its R-level voxels and their corner TSDF; in a fixed
    pose the TSDF is computed once per mesh and reused."""
    from focusing.data.grid import voxel_corners
    from focusing.data.tsdf import corner_tsdf

    from focusing.data import online

    calls = []
    real = online.corner_targets
    monkeypatch.setattr(online, "corner_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    R = 16
    mesh_file = data_dir / "fandisk.ply"
    source = make_source(mesh_file, resolution=R, points=500, batch_size=1, seed=0, augment=None, reuse=1,
                         tsdf_truncation=3.0)
    first, second = source.next_batch(), source.next_batch()
    corners, _ = voxel_corners(first["voxels"])
    assert torch.equal(first["corners"], corners) and first["tsdf"].shape == (len(corners),)
    mesh, _ = normalize(load_mesh(mesh_file))
    assert torch.allclose(first["tsdf"], corner_tsdf(mesh, corners[:, 1:], R, 3.0))
    assert (first["tsdf"] < 0).any() and (first["tsdf"] > 0).any()
    assert torch.equal(second["tsdf"], first["tsdf"]) and len(calls) == 1  # a fixed pose's TSDF: computed once
    augmented = make_source(mesh_file, resolution=R, points=500, batch_size=1, seed=0, augment=AugmentConfig(),
                            tsdf_truncation=3.0).next_batch()
    assert torch.equal(augmented["corners"], voxel_corners(augmented["voxels"])[0])
    source.close()
