"""The torch device a user names ("auto" or None: CUDA when it is available, else the CPU), and compiled code."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """torch.device for "auto" / None (CUDA if available, else CPU) or any name torch accepts ("cpu", "cuda:1")."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_COMPILE: dict | None = None  # torch.compile options while `use_torch_compile` is on
_COMPILE_MIN_ROWS = 0  # calls on fewer rows run the plain function (`fused(fn, rows)`)
_COMPILED: dict = {}


def use_torch_compile(enabled: bool = True, min_rows: int = 0, **options) -> None:
    """Fuse the per-element math of the hot spots with `torch.compile`, forward and backward: the transformer
    blocks' LayerNorms, casts, biases, GELU and residual adds around the attention kernel, the PointNet's per-point
    blocks and poolings, the renderer's per-pixel interpolation and silhouette blending. The same math in fewer
    passes over memory; each function compiles on its first call (tens of seconds). Shapes are dynamic, so inputs
    of any size reuse the compiled code. `options` go to `torch.compile` (train.compile turns this on).
    min_rows: calls that name their row count (`fused(fn, rows)`) below it run uncompiled: on small sets a
    compiled call's host overhead (guards, wrappers) can outweigh what its fusion saves."""
    global _COMPILE, _COMPILE_MIN_ROWS
    _COMPILE = {"dynamic": True, **options} if enabled else None
    _COMPILE_MIN_ROWS = min_rows


def fused(fn, rows: int | None = None):
    """`fn` compiled with the options of `use_torch_compile` while it is on (built once per options and kept),
    else `fn` itself; also `fn` itself for a call on `rows` < its min_rows."""
    if _COMPILE is None or (rows is not None and rows < _COMPILE_MIN_ROWS):
        return fn
    key = (fn, tuple(sorted(_COMPILE.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **_COMPILE)
    return _COMPILED[key]
