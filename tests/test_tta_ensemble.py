"""Test-time augmentation and ensembles on a real tiny run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_recipe
from fer_core import checkpoint
from fer_core.ensemble import Ensemble, build, validate_spec
from fer_core.errors import FerError
from fer_core.inference import ViewAveraging, load_run, probabilities, run_predictions, split_samples
from fer_core.registry import get_registry
from test_cli import fer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fer_subset):
    from fer_core.runner import train

    d = tmp_path_factory.mktemp("tta_run")
    recipe = d / "r.toml"
    recipe.write_text(tiny_recipe(fer_subset, None, epochs=1))
    train(recipe, [], d / "run", None)
    return d / "run"


def tta(**params):
    from fer_core.interfaces import Preprocessing

    return get_registry().build("tta", {"plugin": "standard", **params}, "tta", Preprocessing((32, 32), 1, (0.5,), (0.5,)))


def test_views_are_flips_crops_and_scales_of_the_input():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    views = tta(hflip=True, crops=5, scales=[1.25, 0.8])(x)
    assert len(views) == (1 + 5 + 2) * 2
    assert all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[8], torch.flip(x, dims=[-1]))
    with pytest.raises(FerError, match="no view left"):
        tta(identity=False)


def test_identity_tta_equals_plain_evaluation(run_dir):
    run = load_run(run_dir)
    _, samples = split_samples(run, None)
    plain = run_predictions(run, samples)
    for combine in ("probs", "logits"):
        same = run_predictions(run, samples, tta(hflip=False, combine=combine))
        np.testing.assert_allclose(probabilities(run, same["logits.emotion"]),
                                   probabilities(run, plain["logits.emotion"]), atol=1e-5)
    flipped = ViewAveraging(run.model, tta(hflip=True))(torch.zeros(2, 1, 32, 32))
    assert flipped["emotion"].shape == (2, 7)


def test_eval_with_tta_through_the_cli(run_dir, tmp_path):
    js = tmp_path / "tta.json"
    r = fer("eval", str(run_dir), "--tta", "--json", str(js))
    assert r.returncode == 0, r.stderr
    rep = json.loads(js.read_text())
    assert rep["inference"]["tta_views"] == 2 and rep["inference"]["batched_ms_per_image"] > 0
    assert "TTA view" in r.stdout


def permuted_copy(src, dst):
    """The same model with its classes (and emotion head rows) in reverse order."""
    shutil.copytree(src, dst)
    ck = checkpoint.load(dst / "best.pt")
    ck["classes"] = ck["classes"][::-1]
    for k in list(ck["model"]):
        if k.startswith("heads.emotion"):
            ck["model"][k] = ck["model"][k].flip(0)
    checkpoint.save(dst / "best.pt", ck)
    return dst


def test_ensemble_of_identical_models_equals_the_model_whatever_the_class_order(run_dir, tmp_path):
    other = permuted_copy(run_dir, tmp_path / "reversed")
    run = load_run(run_dir)
    _, samples = split_samples(run, None)
    single = probabilities(run, run_predictions(run, samples)["logits.emotion"])
    for combiner in ({"plugin": "average", "weights": "equal"}, {"plugin": "average", "space": "logits", "weights": "fit"}):
        out = tmp_path / f"ens_{combiner.get('space', 'probs')}"
        spec = validate_spec({"members": [str(run_dir), str(other)], "combiner": combiner}, "t")
        report = build(spec, out)
        np.testing.assert_allclose(Ensemble(out).probabilities(samples), single, atol=1e-5)
        assert report["accuracy"] == pytest.approx(report["members"][0]["accuracy"])
        assert report["size_mb"] == pytest.approx(2 * report["members"][0]["size_mb"])
        assert (out / "members").is_dir() and json.loads((out / "ensemble.json").read_text())["classes"] == run.classes


def test_ensemble_guards_fit_split_size_and_existing_output(run_dir, tmp_path):
    spec = validate_spec({"members": [str(run_dir)], "fit_split": "test"}, "t")
    with pytest.raises(FerError, match="looks like a test split"):
        build(spec, tmp_path / "a")
    spec = validate_spec({"members": [str(run_dir), str(run_dir)], "max_size_mb": 0.001}, "t")
    with pytest.raises(FerError, match=r"total .* MB, over the limit of 0.001 MB"):
        build(spec, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(FerError, match="unknown ensembler plugin 'averag'"):
        validate_spec({"members": [str(run_dir)], "combiner": {"plugin": "averag"}}, "t")


def test_stacking_and_cli_round_trip(run_dir, tmp_path):
    out = tmp_path / "stack"
    r = fer("ensemble", str(run_dir), str(run_dir), "--out", str(out), "--combiner", "stacking")
    assert r.returncode == 0, r.stderr
    assert "ensemble written to" in r.stdout
    probs = Ensemble(out).probabilities(split_samples(load_run(run_dir), None)[1])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    r = fer("eval", str(out))
    assert r.returncode == 0 and "2 member(s)" in r.stdout, r.stderr


def test_ensemble_logits_for_a_batch_match_its_probabilities(run_dir, tmp_path):
    from fer_core.data import eval_transform, load_image

    out = tmp_path / "ens"
    build(validate_spec({"members": [str(run_dir), str(permuted_copy(run_dir, tmp_path / "rev"))]}, "t"), out)
    ens = Ensemble(out)
    run = ens.runs[0]
    _, samples = split_samples(run, None)
    images = torch.stack([eval_transform(run.preprocessing)(load_image(s.path, 1)) for s in samples[:6]])
    got = torch.softmax(ens.logits(images, run.preprocessing), 1).numpy()
    np.testing.assert_allclose(got, ens.probabilities(samples[:6]), atol=1e-5)
