"""Atomic file writes: write to a temporary name in the target folder, then rename over the target.

The temporary of `path` = DIR/NAME.EXT is DIR/.NAME.XXXXXXXX.tmp.EXT (XXXXXXXX: 8 random characters of
`tempfile`'s). A process killed while writing leaves it behind; `temporary_target` recognises such leftovers and
`remove_temporaries(paths)` deletes those of the given files: a batch job calls it for the files it owns.
Writers must write only through these temporaries (a library that renames a temporary of its own into place,
like safetensors' `save_file`, would leave its own leftovers: serialise to bytes and `write_bytes_atomic`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error it is removed.

    The temporary name keeps the target's suffix so writers that infer the format from it still work. The file
    gets the permissions of a plainly created one (0666 less the umask; `mkstemp` alone would leave 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_TEMPORARY = re.compile(r"\.(?P<stem>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>(\.[^.]+)?)")
"""The name `atomic_path` gives the temporary of STEM.SUFFIX (`tempfile.mkstemp`: 8 characters of [a-z0-9_])."""


def temporary_target(name: str) -> str | None:
    """The file name whose temporary `name` is (".x.ab12cd34.tmp.ply" -> "x.ply"), or None if it is not one."""
    m = _TEMPORARY.fullmatch(name)
    return None if m is None else m["stem"] + m["suffix"]


def remove_temporaries(targets: Iterable[str | os.PathLike]) -> int:
    """Delete the temporaries of `targets` left by killed writers (one listing per folder); returns how many.
    Only for files that no running process is writing (e.g. the items of this rank of a batch job)."""
    names: dict[Path, set[str]] = {}
    for target in map(Path, targets):
        names.setdefault(target.parent, set()).add(target.name)
    removed = 0
    for folder, wanted in names.items():
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if temporary_target(f.name) in wanted:
                f.unlink(missing_ok=True)
                removed += 1
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Text version of `write_bytes_atomic` (UTF-8)."""
    write_bytes_atomic(path, text.encode("utf-8"))
