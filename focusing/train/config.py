"""Typed configs: nested dataclasses loaded strictly from YAML / dicts, `--set a.b=value` overrides, and the
trainer's own `TrainConfig` / `DataConfig`.

`from_dict(cls, data, where)` builds `cls` from plain data, coercing each value to its field's annotation (int,
float, bool, str, tuple, list, dict, Optional, Literal choices, nested dataclasses). Any problem (an unknown or
missing key, a value of the wrong type, a value `__post_init__` rejects) raises `InputError` whose single line
names the file and the key path, e.g. `run.yaml:train.stages[1].steps: expected an int, got 'ten'`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from focusing.data.online import AugmentConfig
from focusing.errors import InputError


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Instance of dataclass `cls` from the mapping `data` (missing keys take the defaults); strict."""
    return _coerce(cls, data, where)


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a dataclass instance, fit for YAML / JSON; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def with_defaults(stored: Any, config: Any) -> Any:
    """`stored` (the plain config an earlier version wrote) with every field of the dataclass `config` it lacks set
    to that field's declared default, nested dataclasses alike. Options are added with the old behaviour as their
    default, so a key a checkpoint predates reads as that default: an older run resumes unless the option is now
    set to something else. Fields without a default stay absent."""
    if not (dataclasses.is_dataclass(config) and isinstance(stored, dict)):
        return stored
    filled = dict(stored)
    for f in dataclasses.fields(config):
        if f.name in filled:
            filled[f.name] = with_defaults(filled[f.name], getattr(config, f.name))
        elif f.default is not dataclasses.MISSING:
            filled[f.name] = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            filled[f.name] = to_dict(f.default_factory())
    return filled


def load_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file (an empty file is {}); a missing or malformed file -> InputError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(path, "no such config file") from None
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(path, f"expected a mapping of keys at the top, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | None, where: str = "--set") -> dict:
    """A copy of `data` with each `a.b.c=value` applied; the value is parsed as YAML (`lr=3e-4`, `betas=[0.9,
    0.95]`, `name=S`). Lists are indexed by number (`train.stages.1.steps=500`). Keys are checked later by
    `from_dict`, so a misspelt key fails there with its path."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InputError(where, f"expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, where, ".".join(parts[: depth + 1]))
        last = parts[-1]
        if isinstance(node, list):
            index = _index(node, last, where, key)
            node[index] = value
        else:
            node[last] = value
    return out


def _child(node: Any, part: str, where: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where, path)]
    if not isinstance(node, dict):
        raise InputError(where, f"{path}: cannot set a key inside a {type(node).__name__}")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, where: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise InputError(where, f"{path}: index {part!r} is not in a list of {len(node)}")
    return int(part)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, where)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise InputError(where, f"expected one of {choices}, got {_describe(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, where)
            except InputError as exc:
                errors.append(exc.problem)
        if len(errors) == 1:
            raise InputError(where, errors[0])
        raise InputError(where, f"expected {' or '.join(_name(o) for o in options)}, got {_describe(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(where, f"expected a list, got {_describe(value)}")
        if origin is list:
            inner = args[0] if args else Any
            return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(value) != len(args):
            raise InputError(where, f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args or [Any] * len(value),
                                                                                    value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(where, f"expected a mapping, got {_describe(value)}")
        vt = args[1] if args else Any
        return {str(k): _coerce(vt, v, _join(where, k)) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise InputError(where, f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise InputError(where, f"expected an int, got {_describe(value)}")
    if tp is float:
        number = _number(value)
        if number is not None:
            return float(number)
        raise InputError(where, f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise InputError(where, f"expected a string, got {_describe(value)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise InputError(where, f"expected {_name(tp)}, got {_describe(value)}")


def _join(where: str, key: Any) -> str:
    """`where` + key: "run.yaml" + "train" -> "run.yaml:train", "run.yaml:train" + "lr" -> "run.yaml:train.lr"."""
    return f"{where}{'.' if ':' in os.path.basename(where) else ':'}{key}"


def _number(value: Any) -> int | float | None:
    """int / float value of a number or a numeric string ("1e-4": PyYAML reads exponents without a dot as str)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build_dataclass(cls: type, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise InputError(where, f"expected a mapping of {cls.__name__} keys, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
            raise InputError(where, f"unknown key {key!r}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _coerce(hints[name], value[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(where, f"missing key {name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InputError(where, str(exc)) from None


@dataclass
class StageConfig:
    """One stage of progressive training: the output resolution R and how many steps it lasts."""

    resolution: int  # output grid resolution R of this stage (a multiple of 4)
    steps: int  # steps of this stage; the last stage runs on until TrainConfig.steps

    def __post_init__(self):
        if self.resolution < 4 or self.resolution % 4:
            raise ValueError(f"stage resolution must be a multiple of 4 and >= 4, got {self.resolution}")
        if self.steps < 0:
            raise ValueError(f"stage steps must be >= 0, got {self.steps}")


@dataclass
class TrainConfig:
    """Optimisation, precision, schedule, logging and checkpointing of `focusing.train.Trainer`."""

    steps: int = 100_000  # total optimiser steps of the run (over all stages, resumed runs included)
    batch_size: int = 1  # meshes per process (GPU) and step; the global batch is this times the world size
    lr: float = 1e-4  # peak AdamW learning rate, reached after the warm-up
    min_lr: float = 1e-6  # learning rate at the end of the cosine decay
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decays
    eps: float = 1e-8  # AdamW denominator epsilon
    warmup_steps: int = 1000  # linear warm-up from lr / warmup_steps to lr
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off; the norm is logged either way)
    ema_decay: float = 0.0  # decay of the exponential moving average of the weights (0 = no EMA)
    ema_start: int = 0  # before this step the EMA just copies the weights
    amp: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast dtype on CUDA (fp16 adds a grad scaler); CPU runs fp32
    compile: bool = False  # torch.compile the hot spots' per-element math (focusing.device.use_torch_compile)
    compile_min_rows: int = 0  # with compile: blocks on fewer voxels run uncompiled (faster on small sets)
    log_every: int = 10  # steps between scalar records (means over the interval)
    image_every: int = 1000  # steps between PNG grids of the objective's images (0 = never)
    checkpoint_every: int = 1000  # steps between checkpoints (0 = only at the end and at the time limit)
    checkpoint_shard_mb: float = 16.0  # largest checkpoint / export file, MiB (tensors are sharded by size)
    max_nonfinite: int = 20  # stop the run after this many non-finite losses or gradients in a row
    seed: int = 0  # seed of every random generator (rank r adds r * 100003)
    resolution: int = 256  # output resolution when `stages` is empty
    stages: list[StageConfig] = field(default_factory=list)  # progressive resolution: stages run in order

    def __post_init__(self):
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "log_every": self.log_every,
                    "max_nonfinite": self.max_nonfinite, "checkpoint_shard_mb": self.checkpoint_shard_mb}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        nonneg = {"min_lr": self.min_lr, "weight_decay": self.weight_decay, "warmup_steps": self.warmup_steps,
                  "grad_clip": self.grad_clip, "ema_start": self.ema_start, "image_every": self.image_every,
                  "checkpoint_every": self.checkpoint_every, "compile_min_rows": self.compile_min_rows}
        for name, value in nonneg.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if self.resolution < 4 or self.resolution % 4:
            raise ValueError(f"resolution must be a multiple of 4 and >= 4, got {self.resolution}")
        if self.stages and sum(s.steps for s in self.stages[:-1]) >= self.steps:
            raise ValueError(f"the stages before the last take {sum(s.steps for s in self.stages[:-1])} steps, "
                             f"not less than steps={self.steps}")

    def stage_plan(self) -> list[tuple[int, int]]:
        """[(first step, resolution)] of each stage, in order (a single stage when `stages` is empty)."""
        if not self.stages:
            return [(0, self.resolution)]
        plan, start = [], 0
        for stage in self.stages:
            plan.append((start, stage.resolution))
            start += stage.steps
        return plan

    def stage_at(self, step: int) -> int:
        """Index of the stage that step `step` (0-based) belongs to."""
        starts = [start for start, _ in self.stage_plan()]
        return max(i for i, start in enumerate(starts) if start <= step)


@dataclass
class DataConfig:
    """Where training meshes come from and how each is turned into a training sample."""

    source: str = ""  # source spec for focusing.data.online.make_source (folder, packed corpus or prepare cache)
    points: int = 200_000  # oriented surface points sampled per mesh
    reuse: int = 1  # steps a loaded mesh is used (with fresh samples / cameras) before the next one is loaded
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # focusing.data.online; null: none
    exclude: list[str] = field(default_factory=list)  # meshes or manifests never trained on (e.g. validation)

    def __post_init__(self):
        if self.points <= 0:
            raise ValueError(f"points must be > 0, got {self.points}")
        if self.reuse <= 0:
            raise ValueError(f"reuse must be > 0, got {self.reuse}")
