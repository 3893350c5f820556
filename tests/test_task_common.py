"""The helpers the fine-tuning task modules share (``x2vlm.tasks.common``) and the mapping ->
dataclass helper of the run configs (``x2vlm.config.dataclass_from_mapping``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from x2vlm.config import check_keys, dataclass_from_mapping
from x2vlm.tasks.common import (
    at_least,
    bool_key,
    crop_scale_key,
    evenly_spaced_subset,
    existing_path,
    group_indices,
    grouped_order,
    model_device,
    optional_positive_int_key,
    positive_int_key,
    require_key,
    string_key,
    typed_key,
)


def test_eval_subset_is_evenly_spaced(caplog):
    assert evenly_spaced_subset(list(range(10)), 4, "f") == [0, 3, 6, 9]
    assert evenly_spaced_subset(list(range(4)), None, "f") == [0, 1, 2, 3]
    assert evenly_spaced_subset(list(range(4)), 9, "f") == [0, 1, 2, 3]
    assert evenly_spaced_subset(range(7), 3, "val.json", "questions") == [0, 3, 6]
    assert "val.json: evaluating 3 of 7 questions" in caplog.text


def test_grouped_order_keeps_groups_together_in_first_seen_order():
    keys = ["b", "a", "b", "c", "a", "b"]
    assert group_indices(keys) == [("b", [0, 2, 5]), ("a", [1, 4]), ("c", [3])]
    assert grouped_order(keys) == [0, 2, 5, 1, 4, 3]
    rng = np.random.default_rng(0)
    many = [f"img{k}" for k in rng.integers(0, 20, size=200)]
    first_seen = {}
    for k, key in enumerate(many):
        first_seen.setdefault(key, k)
    assert grouped_order(many) == sorted(range(len(many)), key=lambda k: (first_seen[many[k]], k))


def test_value_helpers_accept_good_values_and_name_the_key():
    data = {"file": "a.json", "flag": False, "n": 3, "none": None, "name": "x", "crop_scale": [0.25, 1]}
    assert require_key(data, "file", "cfg") == "a.json"
    assert bool_key(data, "flag", True, "cfg") is False and bool_key(data, "other", True, "cfg") is True
    assert positive_int_key(data, "n", 1, "cfg") == 3 and positive_int_key(data, "m", 7, "cfg") == 7
    assert optional_positive_int_key(data, "none", "cfg") is None and optional_positive_int_key(data, "n", "cfg") == 3
    assert string_key(data, "name", None, "cfg") == "x" and string_key(data, "other", "d", "cfg") == "d"
    assert crop_scale_key(data, "cfg") == (0.25, 1.0) and crop_scale_key({}, "cfg") == (0.5, 1.0)
    with pytest.raises(ValueError, match="cfg: missing key 'none'"):
        require_key(data, "none", "cfg")
    with pytest.raises(ValueError, match="cfg: key 'n' must be true or false"):
        bool_key(data, "n", True, "cfg")
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ValueError, match="cfg: key 'k' must be a positive integer"):
            positive_int_key({"k": bad}, "k", 1, "cfg")
    with pytest.raises(ValueError, match="cfg: key 'k' must be a positive integer"):
        optional_positive_int_key({"k": 0}, "k", "cfg")
    for bad in ("", 3, None):
        with pytest.raises(ValueError, match="cfg: key 'k' must be a non-empty string"):
            string_key({"k": bad}, "k", None, "cfg")
    for bad in ([0.8, 0.5], [0, 1], [0.5, 1.5], [True, True], [0.5], "0.5,1"):
        with pytest.raises(ValueError, match="cfg: key 'crop_scale' must be"):
            crop_scale_key({"crop_scale": bad}, "cfg")


def test_typed_values_bounds_and_files(tmp_path):
    assert typed_key({"p": 1}, "p", float, 0.5, "cfg") == 1.0 and isinstance(typed_key({"p": 1}, "p", float, 0.5, "cfg"), float)
    assert typed_key({}, "k", str, None, "cfg") is None
    assert typed_key({"k": ["a"]}, "k", (str, list), None, "cfg") == ["a"]
    with pytest.raises(ValueError, match="cfg: key 'k': expected int"):
        typed_key({"k": True}, "k", int, 3, "cfg")
    with pytest.raises(ValueError, match="cfg: key 'k': expected str or list"):
        typed_key({"k": 3}, "k", (str, list), None, "cfg")
    assert at_least(0, "k", "cfg", 0) == 0
    with pytest.raises(ValueError, match="cfg: key 'k': must be >= 1, got 0"):
        at_least(0, "k", "cfg")
    (tmp_path / "here.json").write_text("[]")
    assert existing_path(str(tmp_path / "here.json"), "k", "cfg") == str(tmp_path / "here.json")
    assert existing_path(None, "k", "cfg") is None
    with pytest.raises(FileNotFoundError, match="cfg: key 'k': no file at"):
        existing_path(str(tmp_path / "missing.json"), "k", "cfg")


def test_model_device():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


@dataclass
class Inner:
    lr: float = 1e-4
    decay: float = 0.0


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    items: list[str] | None = None


def test_dataclass_from_mapping_builds_sections_and_rejects_unknown_keys():
    sections = {"inner": Inner, "items": lambda value, where: [f"{where}/{v}" for v in value]}
    built = dataclass_from_mapping(Outer, {"name": "a", "inner": {"lr": 0.5}, "items": ["x"]}, "run.yaml", sections)
    assert built == Outer("a", Inner(lr=0.5), ["run.yaml: items/x"])
    assert dataclass_from_mapping(Outer, {"name": "b"}, "run.yaml", sections) == Outer("b")
    with pytest.raises(ValueError, match=r"run.yaml: unknown key\(s\) \['nmae'\]; known: \['inner', 'items', 'name'\]"):
        dataclass_from_mapping(Outer, {"nmae": "a"}, "run.yaml", sections)
    with pytest.raises(ValueError, match=r"run.yaml: inner: unknown key\(s\) \['lrr'\]"):
        dataclass_from_mapping(Outer, {"name": "a", "inner": {"lrr": 1}}, "run.yaml", sections)
    with pytest.raises(ValueError, match="run.yaml: inner: expected a mapping, got int"):
        dataclass_from_mapping(Outer, {"name": "a", "inner": 3}, "run.yaml", sections)
    with pytest.raises(ValueError, match="run.yaml: expected a mapping, got list"):
        dataclass_from_mapping(Outer, ["name"], "run.yaml")
    check_keys({"a": 1}, {"a", "b"}, "section")
