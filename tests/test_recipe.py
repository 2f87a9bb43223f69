from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from fer_core.errors import FerError
from fer_core.recipe import apply_overrides, dump_toml, load, parse_override, validate

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    raw = tomllib.loads(path.read_text())
    if "members" in raw or "tune" in raw:  # ensemble and tuning recipes: validated by their plugins
        from fer_core.recipe import check_any

        checked = check_any(raw, str(path))
        assert checked["members"] if "members" in raw else checked["tune"]
        return
    recipe, raw = load(path)
    assert raw["model"]["backbone"]["plugin"] == recipe.model.backbone.plugin
    # the resolved recipe is itself a valid recipe and round-trips through TOML
    again = tomllib.loads(dump_toml(raw))
    assert validate(again, "resolved").model_dump() == recipe.model_dump()


def base() -> dict:
    return {"data": {"plugin": "folder", "root": "x"}, "model": {"backbone": {"plugin": "timm", "name": "resnet18"}}}


@pytest.mark.parametrize("raw, message", [
    ({**base(), "trian": {}}, r"r\.toml: trian: unknown key \(did you mean 'train'\?\)"),
    ({**base(), "train": {"epoch": 3}}, r"train\.epoch: unknown key \(did you mean 'epochs'\?\)"),
    ({**base(), "train": {"epochs": "many"}}, r"train\.epochs: .*integer.*'many'"),
    ({**base(), "train": {"precision": "fp8"}}, r"train\.precision: .*'auto', 'fp32', 'bf16' or 'fp16'"),
    ({**base(), "loss": {"plugin": "cross_entropi"}}, r"loss\.plugin: unknown loss plugin 'cross_entropi' \(did you mean 'cross_entropy'\?\)"),
    ({**base(), "optimizer": {"plugin": "adamw", "lr": "fast"}}, r"optimizer\.lr: .*'fast'"),
    ({"model": base()["model"]}, r"data: required key is missing"),
    ({**base(), "model": {"backbone": {"plugin": "timm", "name": "resnet18"}, "heads": {"au": {"plugin": "linear"}}}},
     r"model\.heads: .*'emotion' head is required"),
])
def test_bad_recipes_name_the_key(raw, message):
    with pytest.raises(FerError, match=message):
        validate(raw, "r.toml")


def test_defaults_are_filled_in_and_saved():
    r = validate(base(), "r.toml")
    assert r.loss.plugin == "cross_entropy" and r.train.precision == "auto"
    assert r.model.backbone.params()["pretrained"] is False  # the plugin's default, made explicit


def test_overrides_are_typed_and_nested():
    raw = apply_overrides(base(), ["train.epochs=3", "data.root=/elsewhere", "optimizer.plugin=sgd", "optimizer.lr=1e-4",
                                   "train.compile=true", "model.heads.emotion.plugin=mlp"])
    assert raw["train"] == {"epochs": 3, "compile": True}
    assert raw["data"]["root"] == "/elsewhere"
    assert raw["optimizer"] == {"plugin": "sgd", "lr": 1e-4}
    assert validate(raw, "r").model.heads["emotion"].plugin == "mlp"
    with pytest.raises(FerError, match="expected key.path=value"):
        parse_override("train.epochs")


toml_scalars = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=20),
                         st.floats(allow_nan=False, allow_infinity=False, width=32))


@given(st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True), toml_scalars, max_size=6))
def test_dump_toml_round_trips(d):
    doc = {"name": "x", "table": d, "arr": [{"plugin": "p", **d}]}
    assert tomllib.loads(dump_toml(doc)) == doc
