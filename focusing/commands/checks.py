"""Argument checks shared by the commands, run where the arguments are parsed, before any work starts.

Each `argparse` type below turns a bad value into one line and exit code 2 (`focusing.cli`):
`focusing CMD: error: argument --x: PROBLEM (see focusing CMD --help)`.

    p.add_argument("--device", type=device, default="auto")       # "cpu", "cuda:0": CUDA checked here
    p.add_argument("--views", type=positive_int)                   # also non_negative_int, int_at_least(n),
    p.add_argument("--fov", type=float_in(0, 180))                 #   positive_float, finite_float
    p.add_argument("--out", type=output_folder)                    # Path; exists as a folder or can be made
    p.add_argument("-o", type=output_file((".ply", ".obj")))       # Path; its folder writable, not a folder

`check_output_folder` / `check_output_file` / `check_device` are the same checks raising `FocusingError`, for
paths and devices that are not arguments themselves (e.g. BENCH_DIR/report, a method's `device` option).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from focusing.errors import FocusingError, InputError


def _argtype(check):
    """An argparse type from a check that raises FocusingError (its message becomes argparse's one line)."""

    def convert(text: str):
        try:
            return check(text)
        except FocusingError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = check.__name__  # argparse names the type in "invalid <name> value"
    return convert


def check_device(name: str) -> str:
    """The torch device `name` stands for ("auto": CUDA when available, else the CPU), as a string; raises
    FocusingError for a name torch does not know or a device this machine does not have."""
    import torch

    from focusing.device import resolve_device

    try:
        dev = resolve_device(name.strip())
    except (RuntimeError, ValueError):
        raise FocusingError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FocusingError(f"device {name!r}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FocusingError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise FocusingError(f"device {name!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise FocusingError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    return str(dev)


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise FocusingError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def int_at_least(low: int):
    """argparse type: an integer >= `low` (`positive_int` is int_at_least(1), `non_negative_int` (0))."""

    def integer(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise FocusingError(f"must be {'a positive integer' if low == 1 else f'at least {low}'}, got {value}")
        return value

    return _argtype(integer)


def _finite_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise FocusingError(f"must be a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise FocusingError(f"must be positive, got {value:g}")
    return value


def float_in(low: float, high: float):
    """argparse type: a number strictly between `low` and `high` (e.g. a field of view in degrees)."""

    def number_in_range(text: str) -> float:
        value = _finite_float(text)
        if not low < value < high:
            raise FocusingError(f"must be between {low:g} and {high:g} (exclusive), got {value:g}")
        return value

    return _argtype(number_in_range)


def _probe_writable(folder: Path) -> None:
    """Raise FocusingError unless a file can be created in the existing folder `folder` (a real probe: it also
    catches read-only file systems, which `os.access` misses for root)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".focusing-probe.", dir=folder)
    except OSError as exc:
        raise InputError(folder, f"folder is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_folder(path: str | os.PathLike) -> Path:
    """`path` as a Path, if it is a writable folder or can be created (its nearest existing parent is a writable
    folder); otherwise FocusingError. Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(existing, f"is not a folder, so {path} cannot be created")
    _probe_writable(existing)
    return path


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> Path:
    """`path` as a Path, if a file can be written there: not a folder, a known suffix (when `suffixes` is given),
    in a folder that is writable or can be created; otherwise FocusingError. Nothing is created."""
    text = os.fspath(path)
    path = Path(path)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise InputError(text, "is a folder; give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise InputError(path, f"cannot save this format (supported: {', '.join(suffixes)})")
    check_output_folder(path.parent)
    return path


def output_file(suffixes: tuple[str, ...] | None = None):
    """argparse type: `check_output_file` with these suffixes."""

    def output_file(text: str) -> Path:
        return check_output_file(text, suffixes)

    return _argtype(output_file)


device = _argtype(check_device)
positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
finite_float = _argtype(_finite_float)
positive_float = _argtype(_positive_float)
output_folder = _argtype(check_output_folder)

