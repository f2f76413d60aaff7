"""Pictures: colourings, atomic PNG writing, and the `focusing render` command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from focusing.cli import main
from focusing.render.images import depth_to_rgb, mask_to_gray, normal_to_rgb, save_png


def test_normal_and_depth_colourings():
    n = torch.zeros(2, 3, 3)
    n[0, 0] = torch.tensor([0.0, 0.0, 1.0])
    n[0, 1] = torch.tensor([0.0, 0.0, -0.5])                 # antialiased (scaled) normal
    mask = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    rgb = normal_to_rgb(n, mask)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert tuple(rgb[0, 0]) == (128, 128, 255)
    assert tuple(rgb[0, 1]) == (191, 191, 128)                # (128, 128, 0) half-blended with white
    assert tuple(rgb[1, 2]) == (255, 255, 255)
    depth = torch.tensor([[1.0, 2.0, 0.0], [3.0, 1.5, 0.0]])
    dm = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.5, 0.0]])
    img = depth_to_rgb(depth, dm)
    near, far = img[0, 0].astype(int), img[1, 0].astype(int)
    assert near.sum() > far.sum() + 200                       # near is bright, far is dark
    assert tuple(img[0, 2]) == (255, 255, 255)
    assert np.array_equal(mask_to_gray(np.array([[0.0, 1.0]])), np.array([[0, 255]], dtype=np.uint8))


def test_save_png_atomic(tmp_path):
    a = (np.arange(12, dtype=np.uint8) * 20).reshape(2, 2, 3)
    save_png(a, tmp_path / "sub" / "x.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "x.png")), a)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]
    with pytest.raises(ValueError):
        save_png(a.astype(np.float32), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_render_command(tmp_path, data_dir, capsys):
    out = tmp_path / "pics"
    assert main(["render", str(data_dir / "idler_riser.ply"), "--views", "2", "--out", str(out),
                 "--resolution", "48"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cameras.json"] + [f"view_00{i}_{k}.png" for i in range(2) for k in ("depth", "mask", "normal")]
    mask = np.asarray(Image.open(out / "view_000_mask.png"))
    assert mask.shape == (48, 48) and 50 < (mask > 127).sum() < 48 * 48
    assert len(json.loads((out / "cameras.json").read_text())["view"]) == 2
    assert main(["render", str(tmp_path / "missing.ply"), "--views", "1", "--out", str(out)]) == 1
    assert "missing.ply" in capsys.readouterr().err
