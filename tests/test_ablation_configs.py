"""Every configuration that bench/ablation.py runs is a valid recipe with the intended values:
a typo in an override would otherwise surface only hours into the ablation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fer_core.recipe import load

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablation", REPO / "bench" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)

JOBS = ([("fer2013", c) for c in ablation.FER_CONFIGS] + [("fer2013_long", c) for c in ablation.LONG_CONFIGS]
        + [("ckplus", c) for c in ablation.CK_CONFIGS])


def resolved_recipe(suite: str, config: str) -> dict:
    args = ablation.command(suite, config, 0, "1" if suite == "ckplus" else None)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    return load(REPO / args[2], overrides)[1]  # validation reads no data: no chdir needed


@pytest.mark.parametrize(("suite", "config"), JOBS)
def test_configuration_is_a_valid_recipe(suite, config):
    raw = resolved_recipe(suite, config)
    assert raw["train"]["seed"] == 0
    if suite == "fer2013_long":
        assert raw["train"]["epochs"] == ablation.LONG_EPOCHS
    elif suite == "fer2013":
        assert raw["train"]["epochs"] == 6


def test_long_suite_keeps_a_replaced_schedule():
    """LONG_OVERRIDES set StepLR's step; a configuration that swaps the schedule must win."""
    assert resolved_recipe("fer2013_long", "baseline")["schedule"]["step_size"] == ablation.LONG_STEP
    together = resolved_recipe("fer2013_long", "all_together")["schedule"]
    assert together["plugin"] == "warmup_cosine" and "step_size" not in together


def test_techniques_reach_the_recipe():
    raw = resolved_recipe("fer2013", "+focal_loss")
    assert raw["loss"]["plugin"] == "focal" and raw["loss"]["gamma"] == 2.0
    assert resolved_recipe("fer2013", "+oversampling")["sampler"]["plugin"] == "oversample"
    assert "au" not in resolved_recipe("ckplus", "emotion_only")["model"]["heads"]
