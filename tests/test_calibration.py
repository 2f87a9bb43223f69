from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fer_core import checkpoint
from fer_core.metrics import ece, nll, reliability
from fer_core.registry import get_registry


def fit_temperature(logits, labels, **params) -> float:
    cal = get_registry().build("calibrator", {"plugin": "temperature", **params}, "calibration")
    cal.fit(logits, labels)
    assert np.allclose(cal(logits), logits / cal.state()["temperature"])
    return cal.state()["temperature"]


@st.composite
def logits_and_labels(draw):
    n = draw(st.integers(2, 80))
    c = draw(st.integers(2, 7))
    scale = draw(st.floats(0.1, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = rng.normal(size=(n, c)) * scale
    labels = rng.integers(0, c, size=n)
    return logits, labels


@settings(max_examples=60, deadline=None)
@given(logits_and_labels())
def test_temperature_never_changes_the_argmax_and_never_raises_nll(data):
    logits, labels = data
    t = fit_temperature(logits, labels)
    assert t > 0
    assert (np.argmax(logits / t, 1) == np.argmax(logits, 1)).all()
    assert nll(logits, labels, t) <= nll(logits, labels, 1.0) + 1e-9


def test_temperature_stays_within_its_bounds_on_degenerate_validation_sets():
    logits = np.array([[8.0, 0.0], [0.0, 8.0]])  # two images, both right: NLL falls as T → 0
    assert fit_temperature(logits, np.array([0, 1]), min_t=0.5) == pytest.approx(0.5)
    wrong = np.array([[8.0, 0.0], [0.0, 8.0]])  # both confidently wrong: NLL falls as T → ∞
    assert fit_temperature(wrong, np.array([1, 0]), max_t=5.0) == pytest.approx(5.0)


def test_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 5)) * 2
    labels = np.array([rng.choice(5, p=np.exp(z) / np.exp(z).sum()) for z in true_logits])
    t = fit_temperature(true_logits * 3, labels)  # a model 3× too confident
    assert t == pytest.approx(3.0, rel=0.1)


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    # bins (10 equal): 0.9 → bin 8 (acc 1), 0.8 → bin 7 (acc 0), 0.7 → bin 6 (acc 1), 0.6 → bin 5 (acc 1)
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert ece(probs, labels, n_bins=10) == pytest.approx(expected)
    bins = reliability(probs, labels, n_bins=10)["bins"]
    assert sum(b["count"] for b in bins) == 4


def test_runs_store_a_temperature_and_report_ece_before_and_after(write_recipe, tmp_path):
    from fer_core.predictor import evaluate
    from fer_core.runner import train

    out = tmp_path / "cal"
    _, final = train(write_recipe(epochs=1), [], out, None)
    cal = json.loads((out / "metrics.json").read_text())["calibration"]
    assert {"ece", "ece_calibrated", "nll", "nll_calibrated"} <= set(cal)
    assert cal["calibrator"] == "temperature" and cal["in_sample"] is True
    assert cal["nll_calibrated"] <= cal["nll"] + 1e-9
    stored = checkpoint.load(out / "best.pt")["calibration"]
    assert stored["plugin"] == "temperature"
    assert stored["state"]["temperature"] == pytest.approx(cal["state"]["temperature"])
    ev = evaluate(out, None, [])
    assert ev["calibration"]["nll_calibrated"] == pytest.approx(cal["nll_calibrated"], rel=1e-4)
    assert ev["accuracy"] == pytest.approx(final["accuracy"])


def test_calibration_none_reports_the_raw_softmax(write_recipe, tmp_path):
    from fer_core.runner import train

    out = tmp_path / "nocal"
    train(write_recipe(epochs=1), ["calibration.plugin=\"none\""], out, None)
    cal = json.loads((out / "metrics.json").read_text())["calibration"]
    assert cal["calibrator"] == "none" and cal["nll_calibrated"] == pytest.approx(cal["nll"])


def test_calibrate_command_stores_a_temperature_in_an_existing_run(write_recipe, tmp_path):
    from fer_core.runner import train
    from test_cli import fer

    out = tmp_path / "old"
    train(write_recipe(epochs=1), [], out, None)
    ck = checkpoint.load(out / "best.pt")
    del ck["calibration"]  # as written by a version without calibration
    checkpoint.save(out / "best.pt", ck)
    r = fer("calibrate", str(out))
    assert r.returncode == 0 and "temperature" in r.stdout, r.stderr
    assert "temperature" in checkpoint.load(out / "best.pt")["calibration"]["state"]
    r = fer("calibrate", str(out), "--split", "test")
    assert r.returncode == 2 and "looks like a test split" in r.stderr
