"""Strict typed config loading: coercion, one-line errors naming file and key, overrides, TrainConfig checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from focusing.errors import InputError
from focusing.train.config import (
    DataConfig, StageConfig, TrainConfig, apply_overrides, from_dict, load_yaml, to_dict,
)


@dataclass
class Inner:
    size: int = 2
    ratio: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    kind: Literal["a", "b"] = "a"
    pair: tuple[float, float] = (0.0, 1.0)
    many: tuple[int, ...] = ()
    items: list[Inner] = field(default_factory=list)
    maybe: Optional[int] = None
    inner: Inner = field(default_factory=Inner)
    table: dict[str, float] = field(default_factory=dict)


def test_coercion():
    cfg = from_dict(Outer, {"name": 12, "flag": "yes", "kind": "b", "pair": [1, "2e-1"], "many": [1, 2.0, "3"],
                            "items": [{"size": 4}, {}], "maybe": "7", "inner": {"ratio": "1e-3"},
                            "table": {"a": 1}}, "f.yaml")
    assert cfg.name == "12" and cfg.flag is True and cfg.kind == "b"
    assert cfg.pair == (1.0, 0.2) and cfg.many == (1, 2, 3)
    assert cfg.items == [Inner(4, 0.5), Inner()] and cfg.maybe == 7 and cfg.inner == Inner(2, 1e-3)
    assert cfg.table == {"a": 1.0} and isinstance(cfg.table["a"], float)
    assert from_dict(Outer, {"maybe": None}).maybe is None
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, message", [
    ({"nmae": "x"}, "f.yaml:train: unknown key 'nmae' (did you mean 'name'?)"),
    ({"inner": {"zzz": 1}}, "f.yaml:train.inner: unknown key 'zzz' (known: size, ratio)"),
    ({"items": [{}, {"size": "big"}]}, "f.yaml:train.items[1].size: expected an int, got 'big'"),
    ({"inner": {"size": 2.5}}, "f.yaml:train.inner.size: expected an int, got 2.5"),
    ({"flag": "maybe"}, "f.yaml:train.flag: expected true or false, got 'maybe'"),
    ({"kind": "c"}, "f.yaml:train.kind: expected one of 'a', 'b', got 'c'"),
    ({"pair": [1, 2, 3]}, "f.yaml:train.pair: expected a list of 2 values, got 3"),
    ({"inner": 3}, "f.yaml:train.inner: expected a mapping of Inner keys, got 3"),
    ({"maybe": "seven"}, "f.yaml:train.maybe: expected an int, got 'seven'"),
    ({"flag": True, "name": [1]}, "f.yaml:train.name: expected a string, got [1]"),
])
def test_errors_are_one_line_naming_file_and_key(data, message):
    with pytest.raises(InputError) as info:
        from_dict(Outer, data, "f.yaml:train")
    assert str(info.value) == message


def test_a_whole_file_names_its_top_level_keys_after_a_colon():
    with pytest.raises(InputError) as info:
        from_dict(Outer, {"inner": {"size": "big"}}, "dir/f.yaml")
    assert str(info.value) == "dir/f.yaml:inner.size: expected an int, got 'big'"


def test_overrides():
    data = {"train": {"lr": 1e-4, "stages": [{"resolution": 64, "steps": 10}]}}
    out = apply_overrides(data, ["train.lr=3e-4", "train.stages.0.steps=5", "data.augment.scale=[0.9, 1.1]",
                                 "data.source=corpus.pack"])
    assert data["train"]["lr"] == 1e-4  # the input is not changed
    assert out["train"]["stages"][0]["steps"] == 5 and out["data"]["augment"]["scale"] == [0.9, 1.1]
    assert from_dict(TrainConfig, out["train"]).lr == 3e-4
    assert from_dict(DataConfig, out["data"]).augment.scale == (0.9, 1.1)
    with pytest.raises(InputError, match="--set: expected key=value, got 'train.lr'"):
        apply_overrides(data, ["train.lr"])
    with pytest.raises(InputError, match="train.stages.3: index '3' is not in a list of 1"):
        apply_overrides(data, ["train.stages.3.steps=1"])


def test_load_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  betas: [0.9, 0.95]\n")
    assert from_dict(TrainConfig, load_yaml(path)["train"], f"{path}:train").betas == (0.9, 0.95)
    path.write_text("train: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_yaml(path)
    path.write_text("- a\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_yaml(path)
    with pytest.raises(InputError, match="no such config file"):
        load_yaml(tmp_path / "missing.yaml")


def test_train_config_checks_and_stages():
    assert TrainConfig().amp == "bf16" and TrainConfig().lr == 1e-4 and TrainConfig().weight_decay == 0.01
    cfg = from_dict(TrainConfig, {"steps": 30, "stages": [{"resolution": 256, "steps": 10},
                                                          {"resolution": 512, "steps": 0}]})
    assert cfg.stages[0] == StageConfig(256, 10)
    assert cfg.stage_plan() == [(0, 256), (10, 512)]
    assert [cfg.stage_at(s) for s in (0, 9, 10, 29)] == [0, 0, 1, 1]
    assert TrainConfig(resolution=64).stage_plan() == [(0, 64)]
    for bad, message in [({"min_lr": 1.0}, "min_lr"), ({"steps": 0}, "steps must be > 0"),
                         ({"ema_decay": 1.0}, "ema_decay"), ({"stages": [{"resolution": 30, "steps": 1}]},
                                                             "multiple of 4"),
                         ({"steps": 10, "stages": [{"resolution": 64, "steps": 10}, {"resolution": 128, "steps": 0}]},
                          "not less than steps=10")]:
        with pytest.raises(InputError, match=message):
            from_dict(TrainConfig, bad, "t.yaml:train")
    data = from_dict(DataConfig, {"source": "base-meshes", "augment": {"rotation": "so3", "scale": [0.8, 1.0]},
                                  "exclude": ["meshes/MANIFEST.tsv"]})
    assert data.augment.rotation == "so3" and data.exclude == ["meshes/MANIFEST.tsv"]
