"""The plateau schedule: the engine steps it after each validation with train.monitor's value."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import needs_fer2013
from fer_core.api import ScheduleInfo
from fer_plugins.schedules import make_plateau


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("mode, scores, lrs", [
    ("max", [0.5, 0.6, 0.6, 0.55, 0.7], [0.1, 0.1, 0.05, 0.025, 0.025]),   # no gain twice: halved twice
    ("min", [1.0, 0.9, 0.95, 0.8], [0.1, 0.1, 0.05, 0.05]),               # loss-like: lower is better
])
def test_plateau_follows_the_monitor_direction(mode, scores, lrs):
    opt = _opt()
    sched = make_plateau(opt, ScheduleInfo(epochs=10, steps_per_epoch=5, monitor_mode=mode), factor=0.5,
                         patience=0, threshold=0.0)
    assert sched.interval == "metric"
    seen = []
    for s in scores:
        sched.step(s)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx(lrs)


@needs_fer2013
def test_engine_steps_plateau_on_the_validation_metric(write_recipe, tmp_path, capsys):
    """In a real run: the lr of epoch k+1 is halved exactly when epoch k's val macro-F1 did not
    beat the best so far (patience 0, threshold 0)."""
    from fer_core.cli import main

    recipe = write_recipe(epochs=4)
    text = recipe.read_text().replace('[schedule]\nplugin = "cosine"',
                                      '[schedule]\nplugin = "plateau"\nfactor = 0.5\npatience = 0\nthreshold = 0.0')
    recipe.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe), "--out", str(tmp_path / "run")])
    assert (e.value.code or 0) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "run" / "history.json").read_text())
    best = float("-inf")
    for row, nxt in zip(rows, rows[1:]):
        improved = row["val_macro_f1"] > best
        best = max(best, row["val_macro_f1"])
        assert nxt["lr"] == pytest.approx(row["lr"] * (1.0 if improved else 0.5)), rows
