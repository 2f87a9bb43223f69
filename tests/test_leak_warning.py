"""A run warns when validation accuracy is near-perfect while training is young: the symptom of
validation images that also appear in training (CK+ frames split at random: val 0.988, test 0.746)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fer_core.console import ProgressBar
from fer_core.interfaces import RunInfo

ROW = {"train_loss": 0.1, "val_macro_f1": 0.99, "epoch_seconds": 1.0, "img_per_s": 100.0}


def _epochs(tmp_path: Path, capsys, epochs: int, accuracies: list[float]) -> tuple[str, str]:
    bar = ProgressBar(epochs, live=False)
    run = RunInfo(out_dir=tmp_path, recipe={}, classes=["a", "b"])
    bar.on_fit_start(run)
    for epoch, acc in enumerate(accuracies, 1):
        bar.on_epoch_end(run, epoch, {**ROW, "val_accuracy": acc})
    bar.on_fit_end(run, {})
    return capsys.readouterr().err, (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("epochs, accuracies, warned", [
    (30, [0.70, 0.991], True),             # epoch 2 of 30: young
    (30, [0.5] * 6 + [0.99], False),       # epoch 7 of 30: past the first fifth
    (5, [0.6, 0.97], False),               # high, but not near-perfect
    (30, [0.99, 0.995, 0.999], True),      # warned once, not every epoch
])
def test_near_perfect_validation_early_is_flagged_once(tmp_path, capsys, epochs, accuracies, warned):
    err, log = _epochs(tmp_path, capsys, epochs, accuracies)
    assert err.count("near-perfect this early") == (1 if warned else 0)
    assert log.count("near-perfect this early") == (1 if warned else 0)  # the log file says it too
    if warned:
        assert "split by group" in err
