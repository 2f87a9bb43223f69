"""Test-time augmentation and ensembles (the built-in `ensembles` plugin) on a real tiny run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_recipe
from fer_core import checkpoint
from fer_core.api import FerError, RunPredictor, get_registry, load_predictor, softmax, split_samples
from fer_core.predictor import ViewAveraging, evaluate
from fer_plugins import ensembles
from fer_plugins.ensembles import EnsemblePredictor, build, validate_spec
from test_cli import fer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fer_subset):
    from fer_core.runner import train

    d = tmp_path_factory.mktemp("tta_run")
    recipe = d / "r.toml"
    recipe.write_text(tiny_recipe(fer_subset, None, epochs=1))
    train(recipe, [], d / "run", None)
    return d / "run"


@pytest.fixture(scope="module")
def run(run_dir):
    return load_predictor(run_dir)


@pytest.fixture(scope="module")
def val_samples(run):
    return split_samples(run, None)[1]


def tta(**params):
    from fer_core.interfaces import Preprocessing

    return get_registry().build("tta", {"plugin": "standard", **params}, "tta", Preprocessing((32, 32), 1, (0.5,), (0.5,)))


def probs_of(pred) -> np.ndarray:
    return softmax(pred["calibrated.emotion"])


def one_error_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_views_are_flips_crops_and_scales_of_the_input():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    views = tta(hflip=True, crops=5, scales=[1.25, 0.8])(x)
    assert len(views) == (1 + 5 + 2) * 2
    assert all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[8], torch.flip(x, dims=[-1]))
    with pytest.raises(FerError, match="no view left"):
        tta(identity=False)


def test_identity_tta_equals_plain_evaluation(run, val_samples):
    assert isinstance(run, RunPredictor)
    plain = run.predict(val_samples)
    for combine in ("probs", "logits"):
        same = run.predict(val_samples, tta(hflip=False, combine=combine))
        np.testing.assert_allclose(probs_of(same), probs_of(plain), atol=1e-5)
    flipped = ViewAveraging(run.model, tta(hflip=True))(torch.zeros(2, 1, 32, 32))
    assert flipped["emotion"].shape == (2, 7)


def test_eval_with_tta_through_the_cli(run_dir, tmp_path):
    js = tmp_path / "tta.json"
    r = fer("eval", str(run_dir), "--tta", "--json", str(js))
    assert r.returncode == 0, r.stderr
    rep = json.loads(js.read_text())
    assert rep["inference"]["tta_views"] == 2 and rep["inference"]["batched_ms_per_image"] > 0
    assert "2 view(s)" in r.stdout


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


def test_ensemble_of_identical_models_equals_the_model_whatever_the_class_order(run_dir, run, val_samples, tmp_path):
    other = permuted_copy(run_dir, tmp_path / "reversed")
    single = probs_of(run.predict(val_samples))
    for combiner in ({"plugin": "average", "weights": "equal"}, {"plugin": "average", "space": "logits", "weights": "fit"}):
        out = tmp_path / f"ens_{combiner.get('space', 'probs')}"
        spec = validate_spec({"members": [str(run_dir), str(other)], "combiner": combiner}, "t")
        report = build(spec, out)
        ens = load_predictor(out)  # through the core: the `ensemble` artifact plugin reads the directory
        assert isinstance(ens, EnsemblePredictor) and ens.describe()["kind"] == "ensemble"
        got = ens.predict(val_samples)
        np.testing.assert_allclose(probs_of(got), single, atol=1e-5)
        np.testing.assert_array_equal(got["logits.emotion"], got["calibrated.emotion"])
        np.testing.assert_array_equal(got["label"], [s.label for s in val_samples])
        assert report["accuracy"] == pytest.approx(report["members"][0]["accuracy"])
        assert report["size_mb"] == pytest.approx(2 * report["members"][0]["size_mb"]) == pytest.approx(ens.size_mb())
        assert report["in_sample"] and report["split"] == "val"
        meta = json.loads((out / "ensemble.json").read_text())
        assert (out / "members").is_dir() and meta["classes"] == run.classes
        assert sorted(p.name for p in (out / meta["members"][0]["path"]).iterdir()) == ["best.pt", "recipe.toml"]
        # the resolved spec is stored with the combiner's defaults filled in
        assert "weights" in (out / "ensemble.toml").read_text()


def test_ensemble_guards_fit_split_size_and_existing_output(run_dir, tmp_path):
    spec = validate_spec({"members": [str(run_dir)], "fit_split": "test"}, "t")
    with pytest.raises(FerError, match="fit_split: 'test' looks like a test split"):
        build(spec, tmp_path / "a")
    spec = validate_spec({"members": [str(run_dir), str(run_dir)], "max_size_mb": 0.001}, "t")
    with pytest.raises(FerError, match=r"total .* MB, over the limit of 0.001 MB"):
        build(spec, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    with pytest.raises(FerError, match="exists and is not an empty directory"):
        build(validate_spec({"members": [str(run_dir)]}, "t"), tmp_path / "c")
    with pytest.raises(FerError, match="unknown ensembler plugin 'averag'"):
        validate_spec({"members": [str(run_dir)], "combiner": {"plugin": "averag"}}, "t")
    with pytest.raises(FerError, match=r"t: membres: unknown key \(did you mean 'members'\?\)$"):
        validate_spec({"membres": [str(run_dir)]}, "t")
    with pytest.raises(FerError, match=r"combiner.weights: weights must be ≥ 0 and not all 0"):
        validate_spec({"members": [str(run_dir)], "combiner": {"weights": [0.0]}}, "t")
    with pytest.raises(FerError, match=r"combiner.weights: 3 weights for 1 members"):
        build(validate_spec({"members": [str(run_dir)], "combiner": {"weights": [1, 1, 1]}}, "t"), tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_stacking_and_cli_round_trip(run_dir, val_samples, tmp_path):
    out = tmp_path / "stack"
    r = fer("ensemble", str(run_dir), str(run_dir), "--out", str(out), "--combiner", "stacking")
    assert r.returncode == 0, r.stderr
    assert "ensemble written to" in r.stdout
    assert "combiner stacking (c=1.0) fitted on 'val': coef 7×14 matrix" in r.stdout
    assert "in-sample (fitted on 'val')" in r.stdout
    probs = probs_of(load_predictor(out).predict(val_samples))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    js = tmp_path / "eval.json"
    r = fer("eval", str(out), "--json", str(js))
    assert r.returncode == 0, r.stderr
    rep = json.loads(js.read_text())
    assert rep["inference"]["kind"] == "ensemble" and rep["inference"]["members"] == 2
    assert rep["inference"]["combiner"] == "stacking" and rep["split"] == "val"
    line = one_error_line(fer("eval", str(out), "--tta"))
    assert "--tta: not supported for ensembles (evaluate the members with --tta)" in line


def test_given_weights_from_an_override_merge_into_the_default_combiner(run_dir, tmp_path):
    out = tmp_path / "given"
    r = fer("ensemble", str(run_dir), str(permuted_copy(run_dir, tmp_path / "rev")), "--out", str(out),
            "-o", "combiner.weights=[1,3]")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "ensemble.json").read_text())
    assert meta["combiner"]["plugin"] == "average" and meta["combiner"]["params"]["space"] == "probs"
    assert meta["combiner"]["state"]["weights"] == pytest.approx([0.25, 0.75])
    assert "weights run 0.2500, rev 0.7500" in r.stdout
    assert "in-sample (fitted on 'val')" in r.stdout
    # --combiner naming the default keeps the overridden table; naming another one starts a new table
    spec = ensembles.spec_from_command_line([run_dir], ["combiner.weights=[0.5]"], combiner="average")
    assert spec.combiner.params()["weights"] == [0.5]
    spec = ensembles.spec_from_command_line([run_dir], ["combiner.c=0.5"], combiner="stacking")
    assert spec.combiner.spec() == {"plugin": "stacking", "c": 0.5}
    line = one_error_line(fer("ensemble", str(run_dir), "--out", str(tmp_path / "bad"), "-o", "combiner.weights=[-1]"))
    assert "combiner.weights: weights must be ≥ 0" in line


def test_eval_of_an_ensemble_goes_through_the_cores_evaluate(run_dir, tmp_path):
    out = tmp_path / "ens"
    report = build(validate_spec({"members": [str(run_dir), str(run_dir)]}, "t"), out)
    ev = evaluate(out, None, [])
    assert ev["split"] == "val" and ev["accuracy"] == pytest.approx(report["accuracy"])
    assert ev["inference"]["kind"] == "ensemble" and ev["inference"]["tta_views"] == 1
    assert ev["calibration"]["ece"] == pytest.approx(ev["calibration"]["ece_calibrated"])
    with pytest.raises(FerError, match="--tta: not supported for ensembles"):
        evaluate(out, None, [], tta=True)
    # the file itself names the artifact too
    assert isinstance(load_predictor(out / "ensemble.json"), EnsemblePredictor)


def test_members_may_be_ensembles_and_the_combiner_uses_the_first_members_registry(run_dir, val_samples, tmp_path,
                                                                                    monkeypatch):
    inner = tmp_path / "inner"
    build(validate_spec({"members": [str(run_dir)], "combiner": {"weights": "equal"}}, "t"), inner)
    built = []

    class Spy:
        def __init__(self, reg):
            self.reg = reg

        def build(self, kind, *args):
            built.append(kind)
            return self.reg.build(kind, *args)

        def __getattr__(self, name):
            return getattr(self.reg, name)

    original = ensembles.load_predictor

    def spied(*args, **kwargs):
        pred = original(*args, **kwargs)
        pred.registry = Spy(pred.registry)
        return pred

    monkeypatch.setattr(ensembles, "load_predictor", spied)
    outer = tmp_path / "outer"
    build(validate_spec({"members": [str(inner), str(run_dir)]}, "t"), outer)
    assert "ensembler" in built
    monkeypatch.undo()
    ens = load_predictor(outer)
    assert [m.describe()["kind"] for m in ens.members] == ["ensemble", "run"]
    single = probs_of(load_predictor(run_dir).predict(val_samples))
    np.testing.assert_allclose(probs_of(ens.predict(val_samples)), single, atol=1e-5)


def test_a_corrupt_ensemble_file_is_one_line_naming_it(run_dir, tmp_path):
    out = tmp_path / "ens"
    build(validate_spec({"members": [str(run_dir)]}, "t"), out)
    file = out / "ensemble.json"
    good = file.read_text()
    file.write_text('{"name": "x", "members": [')
    line = one_error_line(fer("eval", str(out)))
    assert f"{file}: not valid JSON" in line
    file.write_bytes(b"\xff\xfe\x00")
    assert f"{file}: not valid JSON" in one_error_line(fer("eval", str(out)))
    meta = json.loads(good)
    del meta["combiner"]
    file.write_text(json.dumps(meta))
    with pytest.raises(FerError, match=f"{file}: not an ensemble written by `fer ensemble`: combiner: required"):
        load_predictor(out)
    meta = json.loads(good)
    meta["combiner"]["state"] = {}
    file.write_text(json.dumps(meta))
    with pytest.raises(FerError, match=f"{file}: the state of combiner 'average' is unreadable"):
        load_predictor(out)
    meta = json.loads(good)
    meta["classes"] = ["a", "b"]
    file.write_text(json.dumps(meta))
    with pytest.raises(FerError, match="the artifact is inconsistent"):
        load_predictor(out)


def test_ensemble_recipes_are_claimed_by_the_plugin(run_dir, tmp_path):
    from fer_core.recipe import check_any

    r = fer("recipe", "check", "recipes/ensemble.toml", "--show")
    assert r.returncode == 0, r.stderr
    assert "recipes/ensemble.toml: valid" in r.stdout and 'weights = "fit"' in r.stdout
    resolved = check_any({"members": [str(run_dir)], "combiner": {"plugin": "stacking"}}, "e.toml")
    assert resolved["combiner"] == {"plugin": "stacking", "c": 1.0} and resolved["fit_split"] == "val"
    with pytest.raises(FerError, match=r"e.toml: combiner.cc: unknown key for ensembler plugin 'stacking'"):
        check_any({"members": [str(run_dir)], "combiner": {"plugin": "stacking", "cc": 1}}, "e.toml")


def test_ensemble_logits_for_a_batch_match_its_probabilities(run_dir, tmp_path):
    from fer_core.data import eval_transform, load_image

    out = tmp_path / "ens"
    build(validate_spec({"members": [str(run_dir), str(permuted_copy(run_dir, tmp_path / "rev"))]}, "t"), out)
    ens = load_predictor(out)
    pre = ens.preprocessing
    _, samples = split_samples(ens, None)
    images = torch.stack([eval_transform(pre)(load_image(s.path, 1)) for s in samples[:6]])
    got = torch.softmax(ens.logits(images, pre), 1).numpy()
    np.testing.assert_allclose(got, probs_of(ens.predict(samples[:6])), atol=1e-5)
