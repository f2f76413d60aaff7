"""benchmarks/compare.py (runs side by side by category / level) and benchmarks/plot_validation.py (the curve)."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_results(path, rows):
    keys = ["name", "level", "status", "fscore", "fscore_fine", "normal_consistency"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(dict(zip(keys, r)) for r in rows)


def test_compare_means_over_the_meshes_every_run_scored(tmp_path):
    write_results(tmp_path / "a.csv", [("cube-1a", 1, "ok", 0.9, 0.8, 0.95), ("cow-2b", 2, "ok", 0.7, 0.6, 0.85),
                                       ("lamp-3c", 2, "ok", 0.1, 0.1, 0.1)])
    write_results(tmp_path / "b.csv", [("cube-9z", 1, "ok", 1.0, 1.0, 1.0), ("cow-8y", 2, "ok", 0.8, 0.7, 0.9),
                                       ("lamp-7x", 2, "failed", "", "", "")])
    (tmp_path / "MANIFEST.tsv").write_text("file\tcategory\ncube.ply\tcad\ncow.ply\torganic\nlamp.ply\tcad\n")
    assert load("compare").main([f"a={tmp_path / 'a.csv'}", f"b={tmp_path / 'b.csv'}", "--manifest",
                                 str(tmp_path / "MANIFEST.tsv"), "--json", str(tmp_path / "c.json")]) == 0
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["meshes"] == ["cow", "cube"]  # lamp failed in b: left out of every mean
    assert abs(out["groups"]["all"]["a"]["fscore"] - 0.8) < 1e-12
    assert abs(out["groups"]["category cad"]["b"]["normal_consistency"] - 1.0) < 1e-12
    assert out["groups"]["level L2"]["n"] == 1


def test_compare_joins_a_run_made_in_parts(tmp_path):
    write_results(tmp_path / "a1.csv", [("cube-1a", 1, "ok", 0.9, 0.8, 0.95), ("cow-2b", 2, "failed", "", "", "")])
    write_results(tmp_path / "a2.csv", [("cow-2c", 2, "ok", 0.7, 0.6, 0.85)])
    write_results(tmp_path / "b.csv", [("cube-9z", 1, "ok", 1.0, 1.0, 1.0), ("cow-8y", 2, "ok", 0.8, 0.7, 0.9)])
    assert load("compare").main([f"a={tmp_path / 'a1.csv'},{tmp_path / 'a2.csv'}", f"b={tmp_path / 'b.csv'}",
                                 "--json", str(tmp_path / "c.json")]) == 0
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["meshes"] == ["cow", "cube"] and abs(out["groups"]["all"]["a"]["fscore"] - 0.8) < 1e-12


def test_plot_draws_every_series(tmp_path):
    tsv = tmp_path / "v.tsv"
    tsv.write_text("gpu_minutes\tstep\tfscore\tfscore_fine\tnormal_consistency\tresults\n"
                   "8\t122\t0.80\t0.55\t0.90\tx.csv\n16\t1087\t0.92\t0.79\t0.96\ty.csv\n")
    module = load("plot_validation")
    assert module.main([str(tsv), "-o", str(tmp_path / "v.png")]) == 0
    pixels = np.asarray(Image.open(tmp_path / "v.png").convert("RGB")).reshape(-1, 3)
    for _, _, colour in module.SERIES:
        assert (pixels == colour).all(1).sum() > 50  # each curve and its points are drawn
