"""Pictures of render outputs: normals, depth and surface error to RGB, PNG writing (atomic).

The colourings blend with a white background by the (antialiased) mask, so silhouettes look smooth.
"""

from __future__ import annotations

import os

import numpy as np

from focusing.io.atomic import atomic_path

BACKGROUND = np.array([255.0, 255.0, 255.0])

# Our depth colour ramp, near -> far: amber, green, teal, blue, dark purple (bright near, dark far); linear in RGB.
_DEPTH_ANCHORS = np.array([[255, 220, 60], [120, 200, 90], [40, 150, 150], [50, 80, 160], [60, 20, 90]],
                          dtype=np.float64)

# Our error colour ramp, 0 -> vmax: deep blue, teal, yellow (the middle), orange, dark red; linear in RGB.
_ERROR_ANCHORS = np.array([[40, 60, 150], [60, 170, 190], [245, 225, 80], [235, 120, 40], [160, 20, 30]],
                          dtype=np.float64)


def _numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _coverage(mask, shape) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=np.float64)
    return np.clip(_numpy(mask).astype(np.float64), 0.0, 1.0)


def _compose(rgb: np.ndarray, cover: np.ndarray) -> np.ndarray:
    out = cover[..., None] * rgb + (1.0 - cover[..., None]) * BACKGROUND
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def normal_to_rgb(normal, mask=None) -> np.ndarray:
    """Unit normals [H, W, 3] (numpy or torch) -> uint8 [H, W, 3]: rgb = (n + 1) / 2, white background.

    Normals are renormalised first (antialiased edge pixels hold mask-scaled normals); mask [H, W] in [0, 1].
    """
    n = _numpy(normal).astype(np.float64)
    cover = _coverage(mask, n.shape[:2])
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    n = np.where(length > 1e-12, n / np.maximum(length, 1e-12), 0.0)
    return _compose((n + 1.0) * 127.5, cover)


def depth_to_rgb(depth, mask=None, near: float | None = None, far: float | None = None) -> np.ndarray:
    """Depth [H, W] -> uint8 [H, W, 3]: a colour ramp from yellow (near) to dark purple (far), white background.

    The range defaults to the min / max depth over covered pixels. Antialiased edge pixels (depth scaled by the
    mask) are divided by the mask first.
    """
    d = _numpy(depth).astype(np.float64)
    cover = _coverage(mask, d.shape) if mask is not None else (d > 0).astype(np.float64)
    d = np.where(cover > 1e-6, d / np.maximum(cover, 1e-6), 0.0)
    inside = cover > 0.5
    if near is None or far is None:
        vals = d[inside] if inside.any() else np.array([0.0, 1.0])
        near = float(vals.min()) if near is None else near
        far = float(vals.max()) if far is None else far
    return _compose(_ramp((d - near) / max(far - near, 1e-12), _DEPTH_ANCHORS), cover)


def error_to_rgb(error, mask=None, vmax: float = 0.01) -> np.ndarray:
    """Distances [H, W] -> uint8 [H, W, 3]: a colour ramp from deep blue (0) over yellow (vmax / 2) to dark red
    (vmax and beyond), white background where mask [H, W] (coverage in [0, 1]) is 0."""
    e = _numpy(error).astype(np.float64)
    return _compose(_ramp(e / vmax, _ERROR_ANCHORS), _coverage(mask, e.shape))


def _ramp(t: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """t [...] clipped to [0, 1] -> RGB [..., 3], piecewise linear through the evenly spaced `anchors` [K, 3]."""
    t = np.clip(np.nan_to_num(t, nan=1.0), 0.0, 1.0) * (len(anchors) - 1)
    k = np.minimum(np.floor(t).astype(np.int64), len(anchors) - 2)
    frac = (t - k)[..., None]
    return (1.0 - frac) * anchors[k] + frac * anchors[k + 1]


def mask_to_gray(mask) -> np.ndarray:
    """Coverage [H, W] in [0, 1] -> uint8 [H, W] (white = covered)."""
    return np.clip(np.rint(_numpy(mask).astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def save_png(array, path: str | os.PathLike) -> None:
    """Write uint8 [H, W] (gray), [H, W, 3] (RGB) or [H, W, 4] (RGBA) to `path` atomically (temp name + rename)."""
    from PIL import Image

    a = _numpy(array)
    if a.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8, got {a.dtype}")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"save_png expects [H,W], [H,W,3] or [H,W,4], got {a.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(a)).save(tmp, format="PNG")
