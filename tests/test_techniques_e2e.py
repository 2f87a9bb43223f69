"""The technique plugins end to end: the card's multi-task ConvNeXt recipe on a miniature RAF-CE
tree in the official format, the CK+ multi-task recipe on real AU labels, and the
double-correction warning."""

from __future__ import annotations

import json

import pytest

from conftest import CKPLUS, REPO
from fer_core.build import build_all
from fer_core.recipe import apply_overrides, read_toml, validate
from fer_core.registry import get_registry
from test_cli import fer

try:
    from builders import make_rafce_tree
except ImportError:  # pragma: no cover
    from tests.builders import make_rafce_tree


def test_multitask_convnext_recipe_runs_on_a_miniature_rafce_tree(tmp_path, mlflow_uri):
    root = make_rafce_tree(tmp_path / "RAF-CE", n_per_class=2, size=100)
    out = tmp_path / "run"
    # as written, except where the data lives, the tracking store, and CI-sized length/input
    r = fer("run", str(REPO / "recipes" / "multitask_convnext.toml"), "--out", str(out),
            "-o", f"data.root={root}", "-o", f"tracking.uri={mlflow_uri}",
            "-o", "train.epochs=2", "-o", "model.backbone.input_size=32")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["classes"]) == 14 and m["classes"][0] == "Happily surprised"
    assert m["au_f1"] and set(m["au_f1"]) <= {f"AU{i}" for i in range(1, 50)}
    assert 0 <= m["au_mean_f1"] <= 1
    saved = (out / "recipe.toml").read_text()
    assert 'plugin = "focal"' in saved and 'plugin = "mix"' in saved and 'preset = "strong"' in saved
    r = fer("eval", str(out), "--split", "test")
    assert r.returncode == 0, r.stderr


MOBILENET = REPO.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


@pytest.mark.skipif(not MOBILENET.is_file(), reason="../shared/weights (ImageNet MobileNetV2) not present")
def test_rafce_best_recipe_runs_on_a_miniature_rafce_tree_and_evaluates_with_ten_crops(tmp_path):
    root = make_rafce_tree(tmp_path / "RAF-CE", n_per_class=2, size=100)
    out = tmp_path / "run"
    # as written (pretrained weights, three heads, faces48 + mix, EMA), except where the data lives,
    # the run's length and input size
    r = fer("run", str(REPO / "recipes" / "rafce_best.toml"), "--out", str(out), "-o", f"data.root={root}",
            "-o", "train.epochs=2", "-o", "model.backbone.input_size=32", "-o", "train.batch_size=16")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["classes"]) == 14 and 0 <= m["au_mean_f1"] <= 1
    saved = (out / "recipe.toml").read_text()
    assert 'preset = "faces48"' in saved and 'plugin = "compound_components"' in saved and 'plugin = "ema"' in saved
    assert 'pretrained = "../shared/weights/mobilenet_v2-b0353104.pth"' in saved
    r = fer("eval", str(out), "--tta", "--json", str(tmp_path / "tta.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "tta.json").read_text())["inference"]["tta_views"] == 10


@pytest.mark.skipif(not (CKPLUS / "labels.csv").is_file(), reason="../shared/data/ckplus48_au not present")
def test_ckplus_multitask_recipe_trains_on_real_au_labels(tmp_path):
    out = tmp_path / "ck"
    r = fer("run", str(REPO / "recipes" / "ckplus_multitask.toml"), "--out", str(out),
            "-o", "train.epochs=2", "-o", "tracking.enabled=false", "-o", "model.backbone.input_size=32")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise"]
    assert list(m["au_f1"])[:3] == ["AU1", "AU2", "AU4"] and len(m["au_f1"]) == 24
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(h["train_loss"] > 0 for h in history)


def test_reweighted_loss_plus_oversampler_warns_about_double_correction(write_recipe):
    path = write_recipe(epochs=1)
    raw = apply_overrides(read_toml(path), ['loss={ plugin = "focal", alpha = "auto" }',
                                            'sampler={ plugin = "oversample" }'])
    recipe = validate(raw, str(path))
    with pytest.warns(UserWarning, match="corrected twice"):
        built = build_all(recipe, get_registry())
    # the oversampler really drives the loader: balanced classes in expectation
    assert len(built.train_loader) == 70 // 16
    raw = apply_overrides(read_toml(path), ['loss={ plugin = "focal", alpha = "none" }',
                                            'sampler={ plugin = "oversample" }'])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build_all(validate(raw, str(path)), get_registry())
