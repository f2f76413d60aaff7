"""Checkpoints and shippable weights without pickle: safetensors files for tensors, JSON for everything else.

A checkpoint is a folder `checkpoint/` holding `checkpoint.json` (step, configs, optimizer hyper-parameters, RNG
and data-source states, counters: any JSON-able tree whose tensors are replaced by references) and
`tensors-NNNNN.safetensors` files of at most `shard_bytes` each (tensors are packed by size, a tensor larger than a
file is split into flat parts). A new checkpoint is written into a temporary folder and swapped in as a whole;
only the latest one is kept. Loading never runs code: safetensors and JSON only.

An export (`export_weights`) is a folder with `weights.safetensors` (or `weights-NNNNN.safetensors` shards when
the weights exceed one file) in a chosen dtype and `config.json` (model config, experiment config, step).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from focusing.errors import FocusingError, InputError

SHARD_BYTES = 16 * 2**20
CHECKPOINT_JSON = "checkpoint.json"
WEIGHTS_JSON = "config.json"
_HEADER_BYTES_PER_TENSOR = 96  # safetensors header bytes per tensor beyond its name (dtype, shape, offsets)
SPLIT_BYTES = 2**20  # a tensor is split across two files only when at least this much of it fits the first


# ---- JSON trees with tensors ------------------------------------------------------------------------------------

def pack_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of a state tree (dicts, lists, tuples, scalars, numpy arrays, tensors); each tensor goes to
    `tensors` under its path below `prefix` and is replaced by {"__tensor__": path}. `unpack_state` inverts it
    exactly (tuples, integer dict keys and numpy dtypes included)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack_state(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[pack_state(k, f"{prefix}/key{i}", tensors), pack_state(v, f"{prefix}/{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {prefix})")


def unpack_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state tree `pack_state` stored, with its tensors taken from `tensors`."""
    if isinstance(obj, list):
        return [unpack_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(unpack_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {unpack_state(k, tensors): unpack_state(v, tensors) for k, v in obj["__items__"]}
    return {k: unpack_state(v, tensors) for k, v in obj.items()}


# ---- sharded safetensors ----------------------------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], stem: str, shard_bytes: int) -> dict:
    """Write `tensors` into `folder/{stem}-NNNNN.safetensors` files of at most `shard_bytes` each
    (`{stem}.safetensors` when one file holds them all). Files are filled in order of decreasing tensor size; a
    tensor that does not fit into the rest of a file is split there (as flat parts `name::i`) when at least
    `SPLIT_BYTES` of it fit, so the number of files stays close to total / shard_bytes. Returns the index for
    `read_shards`: {"files": [...], "split": {name: shape}}."""
    shards: list[list] = [[8, {}]]  # [bytes used, {name: tensor}]
    split: dict[str, list[int]] = {}
    for name in sorted(tensors, key=lambda k: -_nbytes(tensors[k])):
        t = tensors[name].contiguous()
        flat, size = t.reshape(-1), max(t.element_size(), 1)
        pieces, offset = [], 0
        while True:
            used, members = shards[-1]
            room = (shard_bytes - used - len(name) - 16 - _HEADER_BYTES_PER_TENSOR) // size
            left = flat.numel() - offset
            take = left if left <= room else room if (room * size >= SPLIT_BYTES or not members) else 0
            if take <= 0 and left > 0:
                if not members:
                    raise ValueError(f"shard size {shard_bytes} bytes is too small for tensor {name!r}")
                shards.append([8, {}])
                continue
            pieces.append((len(shards) - 1, offset, take))
            shards[-1][0] += take * size + len(name) + 16 + _HEADER_BYTES_PER_TENSOR
            members[name] = None  # reserves the slot; filled below
            offset += take
            if offset >= flat.numel():
                break
            shards.append([8, {}])
        if len(pieces) == 1:
            shards[pieces[0][0]][1][name] = t
            continue
        split[name] = list(t.shape)
        for i, (shard, start, n) in enumerate(pieces):
            members = shards[shard][1]
            del members[name]
            members[f"{name}::{i}"] = flat[start: start + n].clone()
    files = [f"{stem}.safetensors"] if len(shards) == 1 else [f"{stem}-{i:05d}.safetensors"
                                                              for i in range(len(shards))]
    for file, (_, members) in zip(files, shards):
        path = folder / file
        with open(path, "wb") as f:  # serialised in memory: save_file would leave a 0600 file of its own temp
            f.write(save(members))
            f.flush()
            os.fsync(f.fileno())
        if path.stat().st_size > shard_bytes:
            raise RuntimeError(f"{path}: {path.stat().st_size} bytes exceeds the shard size {shard_bytes}")
    return {"files": files, "split": split}


def read_shards(folder: Path, index: dict, where: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of the files named in `index` (from `write_shards`), split tensors put back together."""
    pieces: dict[str, torch.Tensor] = {}
    for file in index["files"]:
        path = folder / file
        if not path.is_file():
            raise InputError(path, f"missing file (listed in {where})")
        try:
            pieces.update(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise InputError(path, f"not a readable safetensors file ({' '.join(str(exc).split())})") from None
    for name, shape in index.get("split", {}).items():
        parts, i = [], 0
        while f"{name}::{i}" in pieces:
            parts.append(pieces.pop(f"{name}::{i}"))
            i += 1
        flat = torch.cat(parts) if parts else torch.empty(0)
        if flat.numel() != int(np.prod(shape)):
            raise InputError(folder, f"tensor {name!r} is incomplete ({flat.numel()} of {int(np.prod(shape))} values)")
        pieces[name] = flat.reshape(shape)
    return pieces


# ---- atomic folders ---------------------------------------------------------------------------------------------

def _write_folder(target: Path, write) -> None:
    """Call `write(tmp)` on a fresh temporary folder beside `target`, then swap it in for `target` as a whole: the
    old folder is renamed aside, the new one renamed in, the old one removed (`find_checkpoint` recovers the old
    one should a crash fall between the two renames)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old"
    tmp.mkdir()
    try:
        write(tmp)
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        try:
            fd = os.open(target.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path, kind: str) -> dict:
    if not path.is_file():
        raise InputError(path, f"missing file: not a {kind} folder")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


# ---- checkpoints ------------------------------------------------------------------------------------------------

def find_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint folder in `directory`: `directory` itself when it holds checkpoint.json, else
    `directory/checkpoint` (or the previous checkpoint a crash during the swap left aside); None when none."""
    directory = Path(directory)
    for candidate in (directory, directory / "checkpoint", directory / ".checkpoint.old"):
        if (candidate / CHECKPOINT_JSON).is_file():
            return candidate
    return None


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, *,
                    shard_bytes: int = SHARD_BYTES) -> int:
    """Replace the checkpoint folder `directory` as a whole by `tensors` + the JSON-able `meta`; returns its bytes."""
    directory = Path(directory)

    def write(tmp: Path) -> None:
        index = write_shards(tmp, tensors, "tensors", shard_bytes)
        _write_json(tmp / CHECKPOINT_JSON, {"format": "focusing.checkpoint", "version": 1, **index, "meta": meta})

    _write_folder(directory, write)
    return sum(f.stat().st_size for f in directory.iterdir())


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint folder written by `save_checkpoint` (or of a run folder holding one)."""
    folder = find_checkpoint(directory)
    if folder is None:
        raise InputError(directory, f"no checkpoint here (no {CHECKPOINT_JSON})")
    data = _read_json(folder / CHECKPOINT_JSON, "checkpoint")
    if data.get("format") != "focusing.checkpoint":
        raise InputError(folder / CHECKPOINT_JSON, "not a focusing checkpoint")
    return read_shards(folder, data, folder / CHECKPOINT_JSON), data["meta"]


# ---- shippable weights ------------------------------------------------------------------------------------------

def export_weights(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float16,
                   use_ema: bool = True, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the shippable folder `out_dir` (weights in `dtype`, EMA weights when the checkpoint has them and
    `use_ema`, plus config.json) from a training checkpoint; returns the weights file (the first shard)."""
    tensors, meta = load_checkpoint(ckpt_dir)
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    ema = {k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")}
    used_ema = bool(use_ema and ema)
    if used_ema:
        model.update(ema)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.items()}
    config = {"format": "focusing.weights", "version": 1, "dtype": str(dtype).removeprefix("torch."),
              "ema": used_ema, "step": meta.get("step"), "model_class": meta.get("model_class"),
              "model": meta.get("model_config"), "experiment": meta.get("experiment")}
    index = {}

    def write(tmp: Path) -> None:
        index.update(write_shards(tmp, weights, "weights", shard_bytes))
        _write_json(tmp / WEIGHTS_JSON, {**config, **index})

    _write_folder(Path(out_dir), write)
    return Path(out_dir) / index["files"][0]


def load_weights(folder: str | os.PathLike, config: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, model config dict) of an export folder, or of a training checkpoint (its raw weights, fp32).

    With `config` (the model config the caller will build) a stored config that differs raises one line naming
    the first differing key. Apply the state dict with `load_state_dict_strict`."""
    folder = Path(folder)
    if (folder / WEIGHTS_JSON).is_file():
        data = _read_json(folder / WEIGHTS_JSON, "weights")
        if data.get("format") != "focusing.weights":
            raise InputError(folder / WEIGHTS_JSON, "not a focusing weights config")
        state, stored, where = read_shards(folder, data, folder / WEIGHTS_JSON), data.get("model"), folder / WEIGHTS_JSON
    elif find_checkpoint(folder) is not None:
        tensors, meta = load_checkpoint(folder)
        state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        stored, where = meta.get("model_config"), find_checkpoint(folder) / CHECKPOINT_JSON
    else:
        raise InputError(folder, f"no weights here (neither {WEIGHTS_JSON} nor {CHECKPOINT_JSON})")
    if config is not None:
        difference = first_difference(stored, config)
        if difference is not None:
            path, have, want = difference
            raise InputError(where, f"model config differs at {path or 'the top'!r}: stored {have!r}, expected "
                                    f"{want!r}")
    return state, stored or {}


def first_difference(have: Any, want: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(key path, have, want) of the first place two JSON-like trees differ, or None when they are equal."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in list(want) + [k for k in have if k not in want]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in have or key not in want:
                return sub, have.get(key, "<absent>"), want.get(key, "<absent>")
            found = first_difference(have[key], want[key], sub)
            if found is not None:
                return found
        return None
    if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)) and len(have) == len(want):
        for i, (h, w) in enumerate(zip(have, want)):
            found = first_difference(h, w, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if have == want else (path, have, want)


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor],
                           where: str | os.PathLike) -> None:
    """Copy `state` into `module` (cast to each tensor's dtype); a missing, unexpected or wrongly shaped key
    raises `InputError(where, ...)` naming the first such key."""
    own = module.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise InputError(where, f"weights do not match the model: missing key {name!r} "
                                    f"(the model expects shape {list(tensor.shape)})")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise InputError(where, f"weights do not match the model: key {name!r} has shape "
                                    f"{list(state[name].shape)}, the model expects {list(tensor.shape)}")
    extra = [name for name in state if name not in own]
    if extra:
        raise InputError(where, f"weights do not match the model: unexpected key {extra[0]!r}"
                                f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    module.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)


def checkpoint_step(directory: str | os.PathLike) -> int | None:
    """Step of the checkpoint in `directory` (reads only the JSON), or None when there is none."""
    folder = find_checkpoint(directory)
    if folder is None:
        return None
    try:
        return int(_read_json(folder / CHECKPOINT_JSON, "checkpoint")["meta"]["step"])
    except (KeyError, TypeError, ValueError):
        raise FocusingError(f"{folder / CHECKPOINT_JSON}: holds no step") from None
