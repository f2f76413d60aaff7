"""`focusing benchmark` and the baselines: rows and table on real meshes, predictions in the GT's frame, a corrupt
file recorded as failed, resume, method options; Poisson gives a closed mesh near the GT (when pymeshlab imports)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import trimesh

from focusing.cli import main
from focusing.errors import FocusingError
from focusing.eval import baselines, levels
from focusing.eval.baselines import make_method, method_identity
from focusing.eval.benchmark import COLUMNS, BenchmarkSettings, read_results, run_benchmark, write_results
from focusing.eval.levels import level_of
from focusing.eval.metrics import nearest_distances, surface_metrics
from focusing.io import load_mesh, normalize

MESHES = ["idler_riser", "featuretype_block", "lilium_surface"]
SMALL = dict(samples=20_000, fine_samples=20_000)
R = 32


@pytest.fixture(scope="module", autouse=True)
def coarse_levels():
    """Sharp-edge densities on a 32^3 remesh instead of 128^3: the same code, a fraction of the time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(levels, "LEVEL_RESOLUTION", 32)
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("meshes")
    for name in MESHES:
        shutil.copy(data_dir / f"{name}.ply", folder / f"{name}.ply")
    (folder / "broken.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 99\n")
    return folder


def _rows(out) -> dict[str, dict]:
    return {row["name"].rsplit("-", 1)[0]: row for row in read_results(out).values()}


def _gt(row) -> object:
    return normalize(load_mesh(row["gt_path"]))[0]


@pytest.fixture(scope="module")
def gt_run(tmp_path_factory, inputs):
    out = tmp_path_factory.mktemp("gt-resample")
    report = run_benchmark([inputs], out, BenchmarkSettings("gt-resample", R, **SMALL), progress=False)
    return out, report


def test_gt_resample_rows_table_and_failure(gt_run):
    out, report = gt_run
    assert (report.done, report.skipped, len(report.failed)) == (3, 0, 1)
    with open(out / "results.csv", newline="") as f:
        assert tuple(csv.DictReader(f).fieldnames) == COLUMNS
    rows = _rows(out)
    assert sorted(rows) == sorted(MESHES + ["broken"])
    bad = rows["broken"]
    assert bad["status"] == "failed" and bad["pred_path"] == "" and bad["chamfer"] == ""
    assert bad["error"].startswith("unreadable PLY file") and "\n" not in bad["error"]
    for name in MESHES:
        row = rows[name]
        assert row["status"] == "ok" and row["error"] == "" and row["method"] == "gt-resample"
        assert row["pred_path"] == f"meshes/{row['name']}.ply" and int(row["resolution"]) == R
        gt, pred = _gt(row), load_mesh(out / row["pred_path"])
        assert nearest_distances(pred.vertices, gt.vertices)[0].max() < 1e-6  # saved in the GT's normalised frame
        cd, f, f_fine = float(row["chamfer"]), float(row["fscore"]), float(row["fscore_fine"])
        assert 0 < cd < 1e-4 and 0.3 < f < 1 and f_fine < f  # the sampling floor of 20K samples
        assert float(row["chamfer_fine"]) > 0 and float(row["normal_consistency"]) > 0.95
        assert float(row["precision"]) == pytest.approx(float(row["recall"]), abs=0.05)
        assert surface_metrics(pred, gt, 20_000, threshold=0.02).fscore > 0.99  # coarse threshold: ~1
        assert int(row["faces"]) == int(row["gt_faces"]) == len(gt.faces)
        assert int(row["level"]) == level_of(float(row["sharp_edge_density"])) in (1, 2, 3, 4)
    table = (out / "table.md").read_text()
    assert "| all | 3 | 1 |" in table and all(f"| L{i} |" in table for i in range(1, 5))
    settings = json.loads((out / "settings.json").read_text())
    assert settings["method"] == "gt-resample" and settings["resolution"] == R and settings["samples"] == 20_000


def test_resume_skips_done_meshes_and_retries_failures(gt_run, inputs, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(gt_run[0], out)
    calls = []
    original = baselines.GtResample.reconstruct
    monkeypatch.setattr(baselines.GtResample, "reconstruct", lambda self, gt, r, **kw: calls.append(1) or
                        original(self, gt, r, **kw))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "meshes").iterdir()}
    report = run_benchmark([inputs], out, BenchmarkSettings("gt-resample", R, **SMALL), progress=False)
    assert (report.done, report.skipped, len(report.failed), len(calls)) == (0, 3, 1, 0)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "meshes").iterdir()}
    assert len(read_results(out)) == 4
    # other settings: the results start afresh (the first two meshes by path: broken, featuretype_block)
    report = run_benchmark([inputs], out, BenchmarkSettings("gt-resample", R, samples=10_000, fine_samples=10_000),
                           limit=2, progress=False)
    assert (report.done, report.skipped, len(report.failed), len(calls)) == (1, 0, 1, 1)
    assert sorted(_rows(out)) == ["broken", "featuretype_block"]


def test_sdf_mc_closed_meshes_in_frame(tmp_path, inputs):
    assert main(["benchmark", "--method", "sdf-mc", "--data", str(inputs), "--resolution", str(R), "--out",
                 str(tmp_path), "--samples", "20000", "--fine-samples", "20000", "--no-report", "--quiet"]) == 0
    rows = _rows(tmp_path)
    assert rows["broken"]["status"] == "failed"
    for name in MESHES:
        row = rows[name]
        assert row["status"] == "ok" and float(row["seconds"]) > 0
        pred = load_mesh(tmp_path / row["pred_path"])
        assert trimesh.load(tmp_path / row["pred_path"], process=False).is_watertight  # as saved (unmerged)
        assert np.abs(pred.vertices).max() < 0.5 + 1.0 / R  # normalised frame, grown by at most a voxel
        assert surface_metrics(pred, _gt(row), 20_000, threshold=2.0 / R).fscore > 0.9
        assert float(row["chamfer"]) < 1e-3
    assert "| all | 3 | 1 |" in (tmp_path / "table.md").read_text()


def test_table_only_fills_missing_or_stale_densities_and_regroups_by_new_thresholds(gt_run, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(gt_run[0], out)
    rows = read_results(out)
    densities = {name: row["sharp_edge_density"] for name, row in rows.items()}
    first, second = sorted(rows)[1:3]
    rows[first]["sharp_edge_density"] = ""  # e.g. benchmarked before levels existed
    rows[second]["sharp_edge_density"], rows[second]["level_measure"] = "999.0", "an older definition"  # stale
    write_results(out, rows)
    monkeypatch.setattr(levels, "LEVEL_THRESHOLDS", (1e6, 2e6, 3e6))  # new thresholds: everything is L1
    assert main(["benchmark", "--table-only", "--out", str(out), "--no-report"]) == 0
    rows = read_results(out)
    for name in (first, second):
        assert float(rows[name]["sharp_edge_density"]) == pytest.approx(float(densities[name]))
        assert rows[name]["level_measure"] == levels.LEVEL_MEASURE
    assert [r["level"] for r in rows.values() if r["status"] == "ok"] == ["1"] * 3
    table = (out / "table.md").read_text()
    assert "| L1 | 3 | 0 |" in table and "| unknown | 0 | 1 |" in table and "| all | 3 | 1 |" in table


def test_poisson_closed_near_gt_and_trimmed_when_open(data_dir):
    pytest.importorskip("pymeshlab")
    gt = normalize(load_mesh(data_dir / "idler_riser.ply"))[0]
    pred = make_method("poisson", {"points": "30000", "trim": "none"}).reconstruct(gt, R, seed=0)
    assert trimesh.Trimesh(pred.vertices, pred.faces).is_watertight
    assert surface_metrics(pred, gt, 20_000, threshold=2.0 / R).fscore > 0.9
    sheet = normalize(load_mesh(data_dir / "lilium_surface.ply"))[0]  # open: untrimmed Poisson closes it
    closed = make_method("poisson", {"points": "30000", "trim": "none"}).reconstruct(sheet, R, seed=0)
    trimmed = make_method("poisson", {"points": "30000"}).reconstruct(sheet, R, seed=0)
    assert not trimesh.Trimesh(trimmed.vertices, trimmed.faces).is_watertight
    m_closed, m_trimmed = (surface_metrics(p, sheet, 20_000, threshold=2.0 / R) for p in (closed, trimmed))
    assert m_trimmed.precision > max(0.9, m_closed.precision + 0.1) and m_trimmed.recall > 0.9


def test_method_options():
    poisson = make_method("poisson", {"trim": "none", "points": "1000", "threads": "1"})
    assert poisson.trim is None and poisson.points == 1000
    assert method_identity(poisson)["options"] == {
        "points": 1000, "trim": None, "samples_per_node": 1.5, "point_weight": 4.0, "scale": 1.1}
    assert make_method("fit", {"steps": "10"}).steps == 10
    with pytest.raises(FocusingError, match="no option 'checkpoint'"):
        make_method("sdf-mc", {"checkpoint": "model.safetensors"})
    with pytest.raises(FocusingError, match="expected float"):
        make_method("poisson", {"trim": "lots"})
    with pytest.raises(FocusingError, match="unknown method"):
        make_method("magic")


def test_cli_errors(tmp_path, capsys):
    assert main(["benchmark", "--out", str(tmp_path)]) == 1
    assert "--method, --data, --resolution required" in capsys.readouterr().err
    assert main(["benchmark", "--method", "sdf-mc", "--data", str(tmp_path / "nothing"), "--resolution", "32",
                 "--out", str(tmp_path), "--no-report"]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_fit_runs_with_its_options(data_dir):
    gt = normalize(load_mesh(data_dir / "idler_riser.ply"))[0]
    fit = make_method("fit", {"steps": "3", "image_size": "64", "view_pool": "4", "device": "cpu"})
    pred = fit.reconstruct(gt, 16, seed=0)
    assert len(pred.faces) > 0 and np.abs(pred.vertices).max() < 0.5 + 2.0 / 16
    assert surface_metrics(pred, gt, 10_000, threshold=2.0 / 16).fscore > 0.8
