"""The visual benchmark report: pictures, page, failures, resumability, and the page in a headless browser."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from focusing.cli import main
from focusing.eval import report
from focusing.eval.report import write_report
from focusing.io import load_mesh, normalize, save_mesh
from focusing.render.images import error_to_rgb

VIEWS, SIZE = 2, 96
ERROR = "CUDA out of memory <script>alert(1)</script> & more"


def _row(name, gt_path, pred_path, status="ok", error="", **numbers):
    row = dict(name=name, gt_path=gt_path, pred_path=pred_path, method="fit", resolution="64", level="1",
               status=status, error=error, seconds="12.5", chamfer="", fscore="", precision="", recall="",
               normal_consistency="", fscore_fine="", chamfer_fine="", unknown_extra="x")
    row.update(numbers)
    return row


def make_bench(root: Path, data_dir: Path) -> Path:
    """A benchmark folder: an offset prediction, an exact copy (GT given relative to the folder), a failed run,
    and an ok row whose prediction file is corrupt."""
    bench = root / "bench"
    (bench / "gt").mkdir(parents=True)
    shutil.copy(data_dir / "idler_riser.ply", bench / "gt" / "riser.ply")
    riser = normalize(load_mesh(data_dir / "idler_riser.ply"))[0]
    save_mesh(riser.transformed(lambda v: v + 0.015), bench / "meshes" / "offset.ply")
    save_mesh(riser, bench / "meshes" / "copy.ply")
    (bench / "meshes" / "corrupt.ply").write_bytes(b"not a mesh at all")
    rows = [
        _row("offset", str(data_dir / "idler_riser.ply"), "meshes/offset.ply", chamfer="4.5678e-05", fscore="0.4321",
             precision="0.4", recall="0.47", normal_consistency="0.9876", fscore_fine="0.1234", level="2"),
        _row("copy", "gt/riser.ply", "meshes/copy.ply", chamfer="6.5e-06", fscore="0.9988", precision="1",
             recall="1", normal_consistency="0.9999"),
        _row("broken", str(data_dir / "balloon_whisk.ply"), "", status="failed", error=ERROR, seconds=""),
        _row("corrupt", str(data_dir / "balloon_whisk.ply"), "meshes/corrupt.ply"),
    ]
    with open(bench / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory, data_dir):
    bench = make_bench(tmp_path_factory.mktemp("report"), data_dir)
    index = write_report(bench, views=VIEWS, resolution=SIZE, device="cpu")
    assert index == bench / "report" / "index.html"
    return bench


def _png(bench: Path, name: str, k: int, kind: str) -> np.ndarray:
    return np.asarray(Image.open(bench / "report" / name / f"view_{k}_{kind}.png").convert("RGB")).astype(int)


def test_page_references_existing_pictures(bench):
    page = (bench / "report" / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert all((bench / "report" / s).is_file() for s in sources)
    expected = {f"{n}/view_{k}_{kind}.png" for n in ("offset", "copy") for k in range(VIEWS)
                for kind in ("gt", "pred", "error")}
    assert expected | {"legend.png"} == set(sources)
    assert not (bench / "report" / "broken").exists() and not (bench / "report" / "corrupt").exists()
    assert 'id="m-offset"' in page and 'href="#m-corrupt"' in page
    assert "http" not in page                                             # nothing fetched from the network


def test_page_numbers_and_escaped_failures(bench):
    page = (bench / "report" / "index.html").read_text()
    for number in ("4.568", "0.4321", "0.9876", "0.1234", "12.5", "0.9988"):   # CD in 1e-5 units
        assert number in page
    assert "<script>alert" not in page
    assert "CUDA out of memory &lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert re.search(r"corrupt</a>: not rendered: .*corrupt\.ply: unreadable PLY", page)
    assert page.count("<script>") == 1                                    # only the page's own check


def test_summary_computed_by_level(bench):
    page = (bench / "report" / "index.html").read_text()
    summary = page[page.index("<h2>Summary</h2>"):page.index("<h2>Failed</h2>")]
    cells = re.findall(r"<tr>(.*?)</tr>", summary)
    level1 = [re.findall(r"<td>(.*?)</td>", c) for c in cells if c.startswith("<td>fit</td><td>64</td><td>1<")]
    # level 1: copy (ok), broken (failed), corrupt (ok in the CSV, no numbers) -> means over copy only
    assert level1 == [["fit", "64", "1", "3", "1", "0.650", "0.9988", "0.9999", "–", "12.5"]]


def test_pictures(bench):
    background = np.array([255, 255, 255])
    for name in ("offset", "copy"):
        for k in range(VIEWS):
            for kind in ("gt", "pred", "error"):
                img = _png(bench, name, k, kind)
                assert img.shape == (SIZE, SIZE, 3)
                assert 0.05 < (img != background).any(-1).mean() < 0.9
    # same cameras: the GT render of an exact copy is the prediction's render
    for k in range(VIEWS):
        assert np.array_equal(_png(bench, "copy", k, "gt"), _png(bench, "copy", k, "pred"))
        assert not np.array_equal(_png(bench, "offset", k, "gt"), _png(bench, "offset", k, "pred"))
    # error colours: an exact copy is all zero-error colour, one moved by 0.015 along each axis has large errors
    zero = error_to_rgb(np.zeros((1, 1)))[0, 0].astype(int)
    top = error_to_rgb(np.full((1, 1), report.ERROR_VMAX))[0, 0].astype(int)
    for k in range(VIEWS):
        copy, offset = _png(bench, "copy", k, "error"), _png(bench, "offset", k, "error")
        covered = (copy != 255).any(-1)
        assert (np.abs(copy[covered] - zero).sum(-1) < 12).mean() > 0.98
        covered = (offset != 255).any(-1)
        assert (np.abs(offset[covered] - top).sum(-1) < 12).mean() > 0.6


def test_error_colour_ramp():
    error = np.array([[0.0, 0.005, 0.01, 0.5], [np.nan, 0.0, 0.0, 0.0]])
    rgb = error_to_rgb(error, np.array([[1, 1, 1, 1], [1, 0, 1, 1]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert tuple(rgb[0, 0]) == (40, 60, 150) and tuple(rgb[0, 1]) == (245, 225, 80)    # 0: blue, vmax / 2: yellow
    assert tuple(rgb[0, 2]) == tuple(rgb[0, 3]) == tuple(rgb[1, 0]) == (160, 20, 30)   # vmax, beyond, NaN: red
    assert tuple(rgb[1, 1]) == (255, 255, 255)                                         # not covered


def test_surface_error_matches_exact_distance(data_dir):
    from focusing.data.distance import surface_distance

    mesh = normalize(load_mesh(data_dir / "idler_riser.ply"))[0]
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.45, 0.45, (2000, 3))
    exact = surface_distance(mesh, points, 1.0).numpy()
    ours = report.surface_error(points, mesh, n_samples=200_000)
    assert (ours >= exact - 1e-12).all()
    near = exact < 0.02                                                   # the range the error pictures show
    assert near.sum() > 100 and np.abs(ours - exact)[near].max() < 1e-3 and np.median(ours - exact) < 1e-9


def test_rerun_keeps_fresh_pictures(bench, monkeypatch):
    picture = bench / "report" / "copy" / "view_0_pred.png"
    stamp = picture.stat().st_mtime_ns
    calls = []
    real = report.render_comparison
    monkeypatch.setattr(report, "render_comparison", lambda *a, **k: calls.append(1) or real(*a, **k))
    write_report(bench, views=VIEWS, resolution=SIZE, device="cpu")
    assert calls == [] and picture.stat().st_mtime_ns == stamp
    pred = bench / "meshes" / "copy.ply"
    later = (bench / "report" / "copy" / "render.json").stat().st_mtime + 10
    os.utime(pred, (later, later))                                        # a newer prediction: render it again
    write_report(bench, views=VIEWS, resolution=SIZE, device="cpu")
    assert calls == [1] and picture.stat().st_mtime_ns != stamp


def test_fewer_views_leave_no_stale_pictures(tmp_path, data_dir):
    bench = make_bench(tmp_path, data_dir)
    write_report(bench, views=2, resolution=32, device="cpu")
    write_report(bench, views=1, resolution=32, device="cpu")
    assert sorted(p.name for p in (bench / "report" / "copy").glob("view_*.png")) == [
        "view_0_error.png", "view_0_gt.png", "view_0_pred.png"]


def test_table_md_and_cli(tmp_path, data_dir, capsys):
    bench = make_bench(tmp_path, data_dir)
    (bench / "table.md").write_text("# Table 1\n\n| method | level | F |\n|---|:-:|---|\n| fit <R=64> | 1 | 0.99 |\n")
    with open(bench / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(bench / "results.csv", "w", newline="") as fh:       # keep the CLI run small: one mesh
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow(rows[2])
    assert main(["report", str(bench), "--views", "1", "--resolution", "32", "--device", "cpu", "--quiet"]) == 0
    page = (bench / "report" / "index.html").read_text()
    assert "<h3>Table 1</h3>" in page and "<td>fit &lt;R=64&gt;</td><td>1</td><td>0.99</td>" in page
    assert "---" not in page
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "results.csv: no such file" in capsys.readouterr().err


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
    return subprocess.run([shutil.which("chromium"), *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (headless) on PATH")
def test_page_in_headless_chromium(bench, tmp_path):
    url = (bench / "report" / "index.html").as_uri()
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", url + "#load-all-images"], tmp_path / "profile")
    n_images = 2 * VIEWS * 3 + 1
    assert f'data-images="loaded {n_images}"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "page.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,900", "--virtual-time-budget=5000", url],
              tmp_path / "profile")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (900, 1200, 3)
    assert (np.abs(img - img[0, 0]).sum(-1) > 30).mean() > 0.02        # text, tables, pictures
