"""`fer pack` and shipped models (plugins/fer_plugins/shipped.py) on a real tiny run: a packed run
holds no pickle, evaluates exactly like its source, is found by name wherever a run is, writes
its outputs outside its (read-only) directory, and every bad input is one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FER2013, tiny_recipe
from fer_core.api import Preprocessing, RunDir, get_registry, hookimpl, load_predictor, shipped_model, split_samples
from fer_plugins.shipped import MODELS
from test_export_onnx import fer, one_error_line  # the in-process `fer` and its one-line error check

SHIPPED_NAME = "tiny_shipped_for_tests"


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fer_subset):
    from fer_core.runner import train

    d = tmp_path_factory.mktemp("pack_run")
    recipe = d / "r.toml"
    recipe.write_text(tiny_recipe(fer_subset, None, epochs=1))
    train(recipe, [], d / "run", None)
    return d / "run"


@pytest.fixture(scope="module")
def packed(run_dir):
    out = run_dir.parent / "packed"
    code, printed, err = fer("pack", str(run_dir), "--out", str(out))
    assert code == 0, err
    return out, printed


@pytest.fixture(scope="module")
def shipped(packed):
    """The packed run installed under a name by a plugin, as a package would ship it."""

    class Models:
        @hookimpl
        def register_shipped_models(self, register):
            register(SHIPPED_NAME, lambda: packed[0])

    reg = get_registry()
    if SHIPPED_NAME not in reg.components["shipped_model"]:
        reg.add_plugin(Models(), "test_shipped_models")
    return SHIPPED_NAME


def test_a_packed_run_has_no_pickle_and_says_where_it_came_from(run_dir, packed):
    out, printed = packed
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["card.json", "confusion_matrix.png", "history.json", "metrics.json", "model.json",
                            "model.safetensors", "recipe.toml"])
    assert not list(out.glob("*.pt"))
    card = json.loads((out / "card.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert card["source"] == str(run_dir) and card["weights"] == "float32"
    assert card["validation"]["accuracy"] == metrics["accuracy"] and card["trained"]["device"] == "cpu"
    assert card["max_abs_logit_delta"] == 0.0  # the same float32 weights
    assert f"packed {run_dir} → {out}" in printed and "max |Δ logits| 0" in printed
    meta = json.loads((out / "model.json").read_text())
    best = RunDir(run_dir).load(RunDir.BEST)
    assert meta["classes"] == best["classes"]
    assert Preprocessing.from_dict(meta["preprocessing"]) == Preprocessing.from_dict(best["preprocessing"])
    assert meta["calibration"] == best["calibration"]


def test_fer_eval_of_a_packed_run_equals_the_run(run_dir, packed, tmp_path):
    a, b = tmp_path / "run.json", tmp_path / "packed.json"
    assert fer("eval", str(run_dir), "--json", str(a))[0] == 0
    code, _, err = fer("eval", str(packed[0]), "--json", str(b))
    assert code == 0, err
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("accuracy", "macro_f1", "confusion_matrix"):
        assert rb[key] == ra[key]
    assert rb["calibration"]["ece_calibrated"] == ra["calibration"]["ece_calibrated"]


def test_half_weights_are_half_the_size_and_predict_alike(run_dir, packed, tmp_path):
    half = tmp_path / "half"
    code, printed, err = fer("pack", str(run_dir), "--out", str(half), "--half")
    assert code == 0, err
    full_size = (packed[0] / "model.safetensors").stat().st_size
    assert (half / "model.safetensors").stat().st_size < 0.55 * full_size
    card = json.loads((half / "card.json").read_text())
    assert card["weights"] == "float16" and 0 < card["max_abs_logit_delta"] < 5e-2
    a, b = load_predictor(run_dir, device="cpu"), load_predictor(half, device="cpu")
    assert next(iter(b.model.parameters())).dtype == torch.float32  # computed in float32 again
    val = split_samples(a, None)[1]
    pa, pb = a.predict(val), b.predict(val)
    np.testing.assert_allclose(pb["logits.emotion"], pa["logits.emotion"], atol=5e-2)
    assert (pb["logits.emotion"].argmax(1) == pa["logits.emotion"].argmax(1)).mean() >= 0.95


def test_a_shipped_model_is_found_by_name_and_writes_outside_its_directory(shipped, packed, tmp_path, monkeypatch):
    assert shipped_model(shipped) == packed[0]
    assert shipped_model("no_such_model") is None
    before = tree(packed[0])
    pred = load_predictor(shipped, device="cpu")
    assert pred.shipped == shipped and pred.name == shipped and pred.describe()["shipped"] == shipped
    monkeypatch.chdir(tmp_path)
    code, printed, err = fer("eval", shipped, "-o", f"data.root={FER2013}")
    assert code == 0 and "accuracy" in printed, err
    code, printed, err = fer("report", shipped, "--no-gradcam")
    assert code == 0, err
    assert (tmp_path / f"report-{shipped}" / "report.html").is_file()
    face = next((FER2013 / "images").glob("*.jpg"))
    code, printed, err = fer("predict", "--no-detect", "--model", shipped, str(face), "--json", "rows.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert len(rows) == 1 and abs(sum(rows[0]["probs"].values()) - 1) < 1e-3
    code, printed, err = fer("export", shipped)
    assert code == 0 and (tmp_path / f"{shipped}.onnx").is_file(), err
    code, _, err = fer("calibrate", shipped)
    assert "installed read-only" in one_error_line(code, err)
    assert tree(packed[0]) == before  # nothing was written into the shipped model


def test_packed_and_shipped_models_are_ensemble_members(run_dir, shipped, tmp_path):
    out = tmp_path / "ens"
    code, printed, err = fer("ensemble", str(run_dir), shipped, "--out", str(out))
    assert code == 0, err
    members = sorted(p.name for p in (out / "members").iterdir())
    assert len(members) == 2 and (out / "members" / members[1] / "model.safetensors").is_file()
    ens = load_predictor(out, device="cpu")
    val = split_samples(ens, None)[1]
    single = load_predictor(run_dir, device="cpu").predict(val)["calibrated.emotion"]
    # two copies of the same weights: the ensemble predicts what each member does
    assert (ens.predict(val)["calibrated.emotion"].argmax(1) == single.argmax(1)).all()


def test_a_path_is_never_taken_for_a_name(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / shipped).mkdir()  # a folder of that name, not a run, in the working directory
    code, _, err = fer("eval", shipped)
    assert f"{shipped}: not a fer run directory" in one_error_line(code, err)
    assert shipped_model(f"sub/{shipped}") is None


def test_bad_inputs_are_one_line_and_leave_files_alone(run_dir, packed, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = fer("pack", str(run_dir), "--out", str(out))
    assert "--out:" in one_error_line(code, err) and "not an empty directory" in err
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = fer("pack", str(run_dir), "--out", str(blocker / "sub"))
    assert "is a file, not a directory" in one_error_line(code, err)
    code, _, err = fer("pack", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p2"))
    assert "no such run directory" in one_error_line(code, err)
    assert not (tmp_path / "p2").exists()
    code, _, err = fer("eval", "no_such_model_name")
    assert "shipped models installed:" in one_error_line(code, err)
    # a damaged packed model: one line naming the file
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in packed[0].iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = fer("eval", str(broken))
    assert f"{broken / 'model.safetensors'}: not a readable safetensors file" in one_error_line(code, err)
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written pack left behind


@pytest.mark.skipif(not (MODELS / "default").is_dir(), reason="no shipped default model in this checkout")
def test_the_shipped_default_model_loads_without_training_or_network():
    pred = load_predictor("default", device="cpu")
    assert pred.shipped == "default"
    assert [c.lower() for c in pred.classes] == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    card = json.loads((MODELS / "default" / "card.json").read_text())
    assert card["size_mb"] <= 20 and card["validation"]["accuracy"] > 0.5
    x = torch.zeros(2, pred.preprocessing.channels, *pred.preprocessing.input_size)
    p = torch.softmax(pred.logits(x, pred.preprocessing), 1)
    assert torch.allclose(p.sum(1), torch.ones(2), atol=1e-5)
