"""Packed corpus (`focusing pack`, `PackedCorpus`) and the held-out test (`focusing.data.holdout`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy.spatial import cKDTree

from focusing.cli import main
from focusing.data.corpus import (
    QUANT_ERROR,
    PackedCorpus,
    decode_mesh,
    encode_mesh,
    is_packed_corpus,
    pack_corpus,
    quantize,
)
from focusing.data.holdout import HeldOut
from focusing.data.prepare import file_sha256
from focusing.errors import InputError
from focusing.io import load_mesh, normalize, save_mesh

MESHES = ["idler_riser.ply", "fandisk.ply", "lilium_surface.ply", "corner_shelf_01.glb", "stone_tomb_01.glb"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("meshes")
    for name in MESHES:
        shutil.copy(data_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory, folder):
    out = tmp_path_factory.mktemp("corpus") / "corpus.safetensors"
    report = pack_corpus([folder], out)
    assert report.packed == len(MESHES) and report.skipped == []
    return out


def test_round_trip_within_the_quantisation_bound(packed, folder):
    corpus = PackedCorpus(packed)
    assert len(corpus) == len(MESHES) and is_packed_corpus(packed)
    for i, key in enumerate(corpus.keys):
        source = folder / key.split("/", 1)[1]
        expected, norm = normalize(load_mesh(source))
        got = corpus.mesh(i)
        assert corpus.ids[i].startswith(source.stem) and corpus.sha256[i] == file_sha256(source)
        np.testing.assert_allclose(corpus.normalization[i], [*norm.center, norm.scale])
        assert got.vertices.dtype == np.float64 and got.faces.dtype == np.int64
        assert (got.vertices.shape, got.faces.shape) == (expected.vertices.shape, expected.faces.shape)
        # Every decoded vertex is its source vertex moved by at most QUANT_ERROR per axis, and the faces
        # are the source faces renumbered (same corners, same order).
        dist, nearest = cKDTree(expected.vertices).query(got.vertices, p=np.inf)
        assert dist.max() <= QUANT_ERROR * (1 + 1e-9)
        assert len(np.unique(nearest)) == len(nearest)
        assert {tuple(f) for f in nearest[got.faces]} == {tuple(f) for f in expected.faces}
        assert np.abs(got.vertices).max() <= 0.5


def test_codec_is_lossless_on_the_quantised_mesh(data_dir):
    mesh, _ = normalize(load_mesh(data_dir / "fandisk.ply"))
    q = quantize(mesh.vertices)
    rng = np.random.default_rng(0)
    faces = mesh.faces[rng.permutation(len(mesh.faces))]  # any face order, any vertex numbering
    q2, f2 = decode_mesh(encode_mesh(q, faces), len(q), len(faces))
    assert q2.dtype == np.uint16 and f2.dtype == np.int64
    np.testing.assert_array_equal(q2[f2], q[faces])
    assert len(encode_mesh(q, mesh.faces)) < 0.4 * (q.nbytes + 4 * mesh.faces.size)


def test_bad_large_and_held_out_meshes_are_skipped(tmp_path, data_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("idler_riser.ply", "fandisk.ply", "lilium_surface.ply", "balloon_whisk.ply"):
        shutil.copy(data_dir / name, src / name)
    (src / "broken.obj").write_text("v 0 0 0\nf 1 2 3\n")  # face indices out of range
    held = tmp_path / "held"
    held.mkdir()
    # The same geometry under another name and format: caught by geometry, not by name or digest.
    save_mesh(load_mesh(data_dir / "lilium_surface.ply"), held / "validation_flower.obj")
    manifest = tmp_path / "MANIFEST.tsv"
    manifest.write_text("file\tsource_path\tsha256\nwhisk.ply\tmodels/balloon_whisk/balloon_whisk.glb\t-\n")
    out = tmp_path / "c.safetensors"
    fandisk_faces = len(load_mesh(data_dir / "fandisk.ply").faces)
    report = pack_corpus([src], out, max_faces=fandisk_faces - 1, exclude=[held, manifest])
    reasons = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in report.skipped}
    assert set(reasons) == {"broken.obj", "fandisk.ply", "lilium_surface.ply", "balloon_whisk.ply"}
    assert "unreadable" in reasons["broken.obj"] and "max_faces" in reasons["fandisk.ply"]
    assert "geometry" in reasons["lilium_surface.ply"] and "name" in reasons["balloon_whisk.ply"]
    assert PackedCorpus(out).keys == ["in/idler_riser.ply"] and report.packed == 1
    assert "skipped" in capsys.readouterr().err


def test_held_out_by_digest(tmp_path, data_dir):
    copy = tmp_path / "renamed.ply"
    shutil.copy(data_dir / "gear_ring.ply", copy)
    held = HeldOut.from_paths([copy])
    assert held.reason(data_dir / "gear_ring.ply", file_sha256(data_dir / "gear_ring.ply")) is not None
    assert held.reason(data_dir / "fandisk.ply", file_sha256(data_dir / "fandisk.ply"),
                       load_mesh(data_dir / "fandisk.ply")) is None


def test_pack_command_and_errors(tmp_path, data_dir, capsys):
    out = tmp_path / "sub" / "corpus.safetensors"
    assert main(["pack", str(data_dir / "idler_riser.ply"), str(data_dir / "stone_tomb_01.glb"), "-o", str(out)]) == 0
    assert "packed 2 meshes" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["corpus.safetensors"]  # no temporary left behind
    with pytest.raises(InputError, match="not a packed corpus"):
        PackedCorpus(data_dir / "fandisk.ply")
    with pytest.raises(InputError, match="no such corpus"):
        PackedCorpus(tmp_path / "missing.safetensors")
    assert main(["pack", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.safetensors")]) == 1
