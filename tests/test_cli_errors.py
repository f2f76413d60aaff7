"""The CLI tells the truth (issue 14): every bad option or output path is one line and a non-zero exit before any
work, batch exit codes, stale results, and a `prepare` killed mid-write leaves nothing behind after the next run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from focusing.cli import main
from focusing.commands import checks
from focusing.commands.format import number, plural
from focusing.data.dataset import ShapeDataset
from focusing.data.prepare import find_items, read_index
from focusing.errors import FocusingError
from focusing.eval import levels
from focusing.io.atomic import remove_temporaries, temporary_target

ROOT = Path(__file__).resolve().parents[1]
MESH = "idler_riser.ply"
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture()
def place(tmp_path, data_dir):
    """Paths the cases name: {mesh} (a good mesh), {tmp} (an empty folder), {file} (a regular file), {ro} (a folder
    no file can be created in), {bench} (a folder holding results.csv)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    unwritable = None
    for folder in (ro, Path("/sys")):  # root ignores permissions; sysfs refuses new files even to root
        try:
            checks.check_output_folder(folder)
        except FocusingError:
            unwritable = folder
            break
    (tmp_path / "work").mkdir()
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.csv").write_text("name,status\n")
    yield {"mesh": str(data_dir / MESH), "tmp": str(tmp_path / "work"), "file": str(tmp_path / "file.txt"),
           "ro": None if unwritable is None else str(unwritable), "bench": str(tmp_path / "bench")}
    (tmp_path / "ro").chmod(0o755)


def _tree(folder: str) -> set[Path]:
    return set(Path(folder).rglob("*"))


# (command line with {placeholders}, exit code, fragment of the one line, needs: "cuda-less" / "ro" / None)
CASES = [
    # the VAE commands share the same checks
    ("train --config configs/tiny.yaml --out {tmp}/t --max-minutes 0", 2, "must be positive", None),
    ("train --config configs/tiny.yaml --out {tmp}/t --device cuda", 2, "CUDA is not available", "cuda-less"),
    ("train --config {tmp}/none.yaml --out {tmp}/t", 1, "no such config file", None),
    ("reconstruct {mesh} -o {tmp}/x.xyz", 2, "cannot save this format", None),
    ("reconstruct {mesh} -o {tmp}/x.ply --points 0", 2, "must be a positive integer", None),
    ("encode {mesh} -o {tmp}/z.ply", 2, "z.ply", None),
    ("decode {tmp}/none.safetensors -o {tmp}/x.ply --device cuda", 2, "CUDA is not available", "cuda-less"),
    # --device, resolved where the arguments are parsed
    ("render {mesh} --out {tmp}/r --device cuda", 2, "CUDA is not available", "cuda-less"),
    ("render {mesh} --out {tmp}/r --device gpu0", 2, "unknown device 'gpu0'", None),
    ("fit {mesh} -r 16 -o {tmp}/x.ply --device cuda:1", 2, "CUDA is not available", "cuda-less"),
    ("fit {mesh} -r 16 -o {tmp}/x.ply --device meta", 2, "unsupported device 'meta'", None),
    ("prepare {mesh} --out {tmp}/c --device cuda", 2, "CUDA is not available", "cuda-less"),
    ("report {bench} --device cuda", 2, "CUDA is not available", "cuda-less"),
    ("benchmark --method sdf-mc --data {mesh} -r 16 --out {tmp}/b --option device=cuda", 1,
     "CUDA is not available", "cuda-less"),
    ("benchmark --method sdf-mc --data {mesh} -r 16 --out {tmp}/b --option device=tpu", 1, "unknown device", None),
    # output paths, checked before any work
    ("render {mesh} --out {file}", 2, "exists and is not a folder", None),
    ("render {mesh} --out {ro}/r", 2, "not writable", "ro"),
    ("render {mesh} --out {file}/r", 2, "is not a folder, so", None),
    ("fit {mesh} -r 16 -o {tmp}", 2, "is a folder; give a file name", None),
    ("fit {mesh} -r 16 -o {tmp}/new/", 2, "is a folder; give a file name", None),
    ("fit {mesh} -r 16 -o {ro}/x.ply", 2, "not writable", "ro"),
    ("fit {mesh} -r 16 -o {file}/x.ply", 2, "is not a folder", None),
    ("fit {mesh} -r 16 -o {tmp}/x.xyz", 2, "cannot save this format", None),
    ("prepare {mesh} --out {file}", 2, "exists and is not a folder", None),
    ("prepare {mesh} --out {ro}/c", 2, "not writable", "ro"),
    ("benchmark --method sdf-mc --data {mesh} -r 16 --out {file}", 2, "exists and is not a folder", None),
    ("benchmark --method sdf-mc --data {mesh} -r 16 --out {ro}/b", 2, "not writable", "ro"),
    ("levels {mesh} --json {tmp}", 2, "is a folder; give a file name", None),
    ("levels {mesh} --json {ro}/l.json", 2, "not writable", "ro"),
    ("report {file}", 1, "is not a folder, so", None),
    ("report {ro}", 1, "not writable", "ro"),
    # counts and numbers
    ("fit {mesh} -r 16 -o {tmp}/x.ply --views 0", 2, "--views: must be a positive integer, got 0", None),
    ("fit {mesh} -r 16 -o {tmp}/x.ply --views-per-step 0", 2, "--views-per-step: must be a positive integer", None),
    ("fit {mesh} -r 16 -o {tmp}/x.ply --image-size 0", 2, "--image-size: must be a positive integer", None),
    ("fit {mesh} -r 16 -o {tmp}/x.ply --steps -1", 2, "--steps: must be at least 0, got -1", None),
    ("fit {mesh} -r 2 -o {tmp}/x.ply", 2, "must be at least 4, got 2", None),
    ("render {mesh} --out {tmp}/r --batch 0", 2, "--batch: must be a positive integer", None),
    ("render {mesh} --out {tmp}/r --views 0", 2, "--views: must be a positive integer", None),
    ("render {mesh} --out {tmp}/r --fov 0", 2, "--fov: must be between 0 and 180", None),
    ("render {mesh} --out {tmp}/r --fov 180", 2, "--fov: must be between 0 and 180", None),
    ("render {mesh} --out {tmp}/r --radius 0", 2, "--radius: must be positive, got 0", None),
    ("render {mesh} --out {tmp}/r --radius -2", 2, "--radius: must be positive", None),
    ("eval {mesh} {mesh} --samples 0", 2, "--samples: must be a positive integer", None),
    ("eval {mesh} {mesh} --samples -5", 2, "--samples: must be a positive integer", None),
    ("eval {mesh} {mesh} --threshold 0", 2, "--threshold: must be positive", None),
    ("eval {mesh} {mesh} --threshold -0.01", 2, "--threshold: must be positive", None),
    ("eval {mesh} {mesh} --threshold nan", 2, "--threshold: must be a finite number", None),
    ("eval {mesh} {mesh} --threshold inf", 2, "--threshold: must be a finite number", None),
    ("eval {mesh} {mesh} --samples many", 2, "expected an integer, got 'many'", None),
    ("prepare {mesh} --out {tmp}/c --truncation 0", 2, "--truncation: must be positive", None),
    ("prepare {mesh} --out {tmp}/c --truncation -1", 2, "--truncation: must be positive", None),
    ("prepare {mesh} --out {tmp}/c --workers 0", 2, "--workers: must be a positive integer", None),
    ("prepare {mesh} --out {tmp}/c --rank -1", 2, "--rank: must be at least 0", None),
    ("benchmark --method sdf-mc --data {mesh} -r 16 --out {tmp}/b --samples 0", 2, "--samples: must be a positive", None),
    ("report {bench} --views 0", 2, "--views: must be a positive integer", None),
    # messages that named the wrong problem
    ("eval {tmp} {mesh}", 1, "work: is a folder, not a mesh file", None),
    ("render {tmp} --out {tmp}/r", 1, "work: is a folder, not a mesh file", None),
    ("fit {tmp} -r 16 -o {tmp}/x.ply", 1, "work: is a folder, not a mesh file", None),
    ("benchmark --method sdf-mc --data {mesh} -r 16 --out {tmp}/b --checkpoint model.safetensors", 1,
     "method sdf-mc takes no checkpoint", None),
    ("benchmark --method sdf-mc --data {mesh} -r 16 --out {tmp}/b --option magic=1", 1, "has no option 'magic'", None),
]


@pytest.mark.parametrize("line, code, fragment, needs", CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_are_one_line_before_any_work(place, capsys, line, code, fragment, needs):
    if needs == "cuda-less" and not NO_CUDA:
        pytest.skip("this machine has CUDA")
    if needs == "ro" and place["ro"] is None:
        pytest.skip("no folder here refuses new files")
    before = _tree(place["tmp"])
    assert main(line.format(**place).split()) == code
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and fragment in err, err
    assert "Traceback" not in err and err.startswith(f"focusing {line.split()[0]}: error: ")
    assert _tree(place["tmp"]) == before  # nothing written, not even a folder


def test_the_checkpoint_message_asks_the_methods(monkeypatch):
    """"No method takes one yet" only while that holds: a method with a `checkpoint` field is named instead."""
    import dataclasses

    from focusing.commands.benchmark import check_options
    from focusing.errors import FocusingError
    from focusing.eval import baselines

    with pytest.raises(FocusingError, match=r"takes no checkpoint \(only vae takes one\)"):
        check_options("sdf-mc", {"checkpoint": "m.safetensors"})
    check_options("vae", {"checkpoint": "m.safetensors"})  # accepted
    monkeypatch.setattr(baselines, "METHODS", {k: v for k, v in baselines.METHODS.items() if k != "vae"})
    with pytest.raises(FocusingError, match=r"takes no checkpoint \(no method takes one yet\)"):
        check_options("sdf-mc", {"checkpoint": "m.safetensors"})
    model = dataclasses.make_dataclass("Model", [("checkpoint", str, "")])
    monkeypatch.setitem(baselines.METHODS, "model", model)
    model.name = "model"
    with pytest.raises(FocusingError, match=r"takes no checkpoint \(only model takes one\)"):
        check_options("sdf-mc", {"checkpoint": "m.safetensors"})


def test_formats_for_people():
    assert [plural(1, "vertex"), plural(2, "vertex"), plural(1024, "face")] == ["1 vertex", "2 vertices", "1,024 faces"]
    assert number(1.5) == "1.5000" and number(0.0) == "0.0000"
    assert number(1.234567e65) == "1.2346e+65" and number(3e-7) == "3.0000e-07" and number(math.inf) == "inf"


def test_huge_mesh_prints_a_readable_chamfer(tmp_path, data_dir, capsys):
    import trimesh

    mesh = trimesh.load(data_dir / MESH, process=False)
    mesh.vertices *= 1e30
    mesh.export(tmp_path / "huge.ply")
    assert main(["eval", str(tmp_path / "huge.ply"), str(data_dir / MESH), "--samples", "500"]) == 0
    chamfer = capsys.readouterr().out.splitlines()[0]
    assert "e+" in chamfer and len(chamfer) < 80, chamfer


def test_binary_garbage_is_a_file_problem(tmp_path, monkeypatch, capsys):
    """A broken STL that trimesh tries to read as text, where the encoding guesser is not installed."""
    monkeypatch.setitem(sys.modules, "charset_normalizer", None)
    (tmp_path / "bad.stl").write_bytes(b"\xff\xfe\x00\x81" * 100 + b"\x9c")
    assert main(["eval", str(tmp_path / "bad.stl"), str(tmp_path / "bad.stl")]) == 1
    err = capsys.readouterr().err
    assert "bad.stl: unreadable STL file (not a valid STL file)" in err and "charset" not in err


# ------------------------------------------------------------------------------------------------ batch exit codes


def test_batch_exit_codes(tmp_path, data_dir, capsys, monkeypatch):
    """prepare / benchmark: exit 1 when nothing succeeded, 0 when some items failed (logged as "failed")."""
    monkeypatch.setattr(levels, "LEVEL_RESOLUTION", 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\nend_header\n1 2\n")
    (bad / "b.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")  # degenerate
    prep = ["--resolution", "16", "--points", "256", "--device", "cpu", "--quiet"]
    assert main(["prepare", str(bad), "--out", str(tmp_path / "c1"), *prep]) == 1
    err = capsys.readouterr().err
    assert err.count("focusing prepare: failed ") == 2 and "prepared 0, skipped 0 (already done), failed 2" in err
    mixed = [str(bad), str(data_dir / MESH)]
    assert main(["prepare", *mixed, "--out", str(tmp_path / "c2"), *prep]) == 0
    assert "prepared 1, skipped 0 (already done), failed 2" in capsys.readouterr().err
    assert main(["prepare", *mixed, "--out", str(tmp_path / "c2"), *prep]) == 0  # done before: not a failure
    assert main(["prepare", *mixed, "--out", str(tmp_path / "c2"), *prep, "--strict"]) == 1

    bench = ["--method", "gt-resample", "-r", "16", "--samples", "500", "--fine-samples", "500", "--no-report",
             "--quiet"]
    assert main(["benchmark", "--data", str(bad), "--out", str(tmp_path / "b1"), *bench]) == 1
    assert "benchmarked 0, skipped 0 (already done), failed 2; results in " in capsys.readouterr().err
    assert main(["benchmark", "--data", *mixed, "--out", str(tmp_path / "b2"), *bench]) == 0
    err = capsys.readouterr().err
    assert "benchmarked 1," in err and f"results in {tmp_path / 'b2' / 'results.csv'}" in err and "//" not in err


# ----------------------------------------------------------------------------------------------- stale results


def test_render_replaces_an_earlier_render(tmp_path, data_dir, capsys):
    out = tmp_path / "pics"
    base = ["render", str(data_dir / MESH), "--out", str(out) + "/", "--resolution", "16", "--device", "cpu"]
    assert main([*base, "--views", "3"]) == 0
    (out / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    assert main([*base, "--views", "1"]) == 0
    assert "removed 6 pictures of an earlier render with more views" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["cameras.json", "notes.txt", "view_000_depth.png",
                                                     "view_000_mask.png", "view_000_normal.png"]


def test_prepare_refuses_a_cache_of_other_settings(tmp_path, data_dir, capsys):
    out = tmp_path / "cache"
    prep = ["prepare", str(data_dir / MESH), "--out", str(out), "--points", "256", "--device", "cpu", "--quiet"]
    assert main([*prep, "--resolution", "16"]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main([*prep, "--resolution", "32"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prepared with resolution 16 (now 32)" in err and "give another --out" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing overwritten
    assert main([*prep, "--resolution", "16", "--seed", "1"]) == 1 and "seed 0 (now 1)" in capsys.readouterr().err


def test_item_ids_follow_the_name_a_mesh_is_given_under(tmp_path, data_dir):
    """The documented rule: a file given directly is keyed by its file name, one found in a folder by
    FOLDER/relative path, so the same mesh gets two ids; the same inputs give the same ids on every run."""
    folder = tmp_path / "meshes"
    folder.mkdir()
    (folder / MESH).write_bytes((data_dir / MESH).read_bytes())
    direct, found = find_items([folder / MESH]), find_items([folder])
    assert [i.key for i in direct] == [MESH] and [i.key for i in found] == [f"meshes/{MESH}"]
    assert direct[0].id != found[0].id and find_items([folder])[0].id == found[0].id


# ---------------------------------------------------------------------------------------------- kill-safe writes

_STALL = """
import pathlib, sys, time
write_bytes = pathlib.Path.write_bytes
def stalled(self, data):  # write half of an item, then hang until killed
    if self.name.endswith(".tmp.safetensors"):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        time.sleep(600)
    return write_bytes(self, data)
pathlib.Path.write_bytes = stalled
from focusing.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _ours(folder: Path) -> list[Path]:
    """Every hidden file under `folder`: our temporaries and any other writer's (safetensors' .tmpXXXXXX)."""
    return sorted(f for f in folder.rglob(".*") if f.is_file())


def test_prepare_killed_mid_write_leaves_nothing_after_the_next_run(tmp_path, data_dir, capsys):
    out = tmp_path / "cache"
    args = ["prepare", str(data_dir / MESH), "--out", str(out), "--resolution", "16", "--points", "4096",
            "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _STALL, *args], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(temporary_target(f.name) and f.stat().st_size for f in _ours(out)):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no temporary appeared"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    left = _ours(out)
    assert len(left) == 1 and temporary_target(left[0].name).endswith(".safetensors")  # ours, half-written
    assert not list(out.glob("items/*/[!.]*"))  # no item under its final name
    assert main(args) == 0
    assert "removed 1 temporary file(s) of a killed run" in capsys.readouterr().err
    assert _ours(out) == []
    entries = read_index(out)
    assert [e["status"] for e in entries] == ["ok"]
    item = ShapeDataset(out)[0]
    assert item["points"].shape == (4096, 3) and len(item["voxels"]) > 0


def test_remove_temporaries_touches_only_those_of_the_given_files(tmp_path):
    names = [".a.abcd1234.tmp.safetensors", ".a.b.abcd1234.tmp.safetensors", ".tmpXYZ123", "a.safetensors",
             ".a.short.tmp.safetensors"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert remove_temporaries([tmp_path / "a.safetensors", tmp_path / "gone" / "z.json"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_table_header_and_report_bullets():
    from focusing.eval.benchmark import format_table
    from focusing.eval.report import _markdown_tables

    paper = format_table([], {"samples": 100_000, "threshold": 0.005})
    other = format_table([], {"samples": 20_000, "threshold": 0.005})
    assert "100,000 samples per surface (the paper's protocol)" in paper
    assert "20,000 samples per surface." in other and "paper's protocol" not in other
    page = _markdown_tables(other)
    assert "<ul><li>CD: Chamfer distance" in page and "<p>- " not in page and page.count("<li>") == 3


def test_an_empty_fit_names_the_mesh_and_the_resolution(tmp_path, data_dir, capsys, monkeypatch):
    import focusing.sparseflex.fit as fit

    def empty(*args, **kwargs):
        raise FocusingError("SparseFlex extraction produced an empty mesh")

    monkeypatch.setattr(fit, "fit_mesh", empty)
    assert main(["fit", str(data_dir / MESH), "-r", "8", "-o", str(tmp_path / "x.ply"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{MESH}: fit at R=8: SparseFlex extraction produced an empty mesh" in err
    assert "try a higher --resolution" in err and not (tmp_path / "x.ply").exists()
