"""`fer tune`: Optuna studies whose trials are real (seconds-long) runs on real FER2013 faces.

The space is validated before anything runs; a study writes best.toml (a recipe `fer run`
accepts), study.json and Optuna's figures; a crashing trial is recorded as failed and the study
goes on; pruning stops a trial at an epoch's end; the same command continues a study (a killed
trial is marked failed and retried from its checkpoint); two workers share one journal file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, needs_fer2013

pytestmark = [needs_fer2013]

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
TWO_PARAMS = """
"optimizer.lr" = { type = "float", low = 1e-3, high = 1e-2, log = true }
"model.heads.emotion.dropout" = { type = "float", low = 0.0, high = 0.5 }
"""


def tune_recipe(write_recipe, space: str = TWO_PARAMS, tune: str = 'sampler = "random"', **train) -> Path:
    """The conftest's seconds-long recipe plus a [tune] table."""
    path = write_recipe(**{"epochs": 1, **train})
    path.write_text(path.read_text() + f"\n[tune]\n{tune}\n[tune.space]\n{space}")
    return path


def fer(*args: str, capsys) -> tuple[int, str, str]:
    """`fer ...` in this process (no interpreter start-up per call): exit code, stdout, stderr."""
    from fer_core.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def summary(study: Path) -> dict:
    return json.loads((study / "study.json").read_text())


# ------------------------------------------------------------------ before anything runs


def test_space_is_validated_before_any_trial(write_recipe, tmp_path, capsys):
    study = tmp_path / "study"
    bad = {
        '"model.heads.emotion.dropuot" = { type = "float", low = 0.0, high = 0.5 }':
            ("model.heads.emotion.dropuot", "did you mean 'model.heads.emotion.dropout'"),
        '"optimzer.lr" = { type = "float", low = 1e-3, high = 1e-2 }': ("optimzer", "did you mean 'optimizer.lr'"),
        '"batch_transforms[0].alpha" = { type = "float", low = 0.1, high = 0.5 }': ("batch_transforms", "0 entries"),
        '"optimizer.lr" = { type = "float", low = 1e-2, high = 1e-3 }': ("optimizer.lr", "low must be below high"),
        '"optimizer.lr" = { type = "float", low = 0.0, high = 1e-2, log = true }': ("optimizer.lr", "needs low > 0"),
        '"optimizer.lr" = { type = "float", low = 1e-3, hihg = 1e-2 }': ("hihg", "did you mean 'high'"),
        '"optimizer.lr" = { type = "uniform", low = 1e-3, high = 1e-2 }': ("type", "categorical"),
        # every bound and every choice must give a valid recipe
        '"model.heads.emotion.dropout" = { type = "float", low = 0.0, high = 1.5 }': ("high (1.5)", "dropout"),
        '"loss" = { type = "categorical", choices = [{ plugin = "focal" }, { plugin = "focall" }] }':
            ("choice 'focall'", "did you mean 'focal'"),
        '"train.batch_size" = { type = "float", low = 8, high = 32 }': ("train.batch_size", "low (8"),
    }
    for space, (name, hint) in bad.items():
        code, _, err = fer("tune", tune_recipe(write_recipe, space), "--study-dir", study, capsys=capsys)
        assert code == 2, (space, err)
        assert name in err and hint in err, (space, err)
        assert "Traceback" not in err
    code, _, err = fer("tune", tune_recipe(write_recipe, tune='sampler = "tpe"\nsmapler = 1'), "--study-dir", study,
                       capsys=capsys)
    assert code == 2 and "tune.smapler" in err and "did you mean 'sampler'" in err, err
    code, _, err = fer("tune", tune_recipe(write_recipe, tune='pruner = "threshold"'), "--study-dir", study,
                       capsys=capsys)
    assert code == 2 and "needs lower" in err, err
    assert not study.exists()  # nothing was run, nothing was written

    # `fer recipe check` knows tuning recipes (validate_recipe hook): the shipped one passes
    code, out, err = fer("recipe", "check", REPO / "recipes" / "tune_quickstart.toml", "--show", capsys=capsys)
    assert code == 0, err
    assert "valid" in out and '"batch_transforms[0].alpha"' in out and 'plugin = "mixup"' in out
    code, _, err = fer("recipe", "check", tune_recipe(write_recipe, '"optimizer.lrr" = { type = "float", low = 1, '
                                                                    'high = 2 }'), capsys=capsys)
    assert code == 2 and "did you mean 'optimizer.lr'" in err


def test_tuner_contract_in_memory():
    """The Tuner contract (objective(overrides) → score) without training: seeded, reproducible."""
    from fer_core.api import get_registry
    from fer_plugins.tune_optuna import parse_space

    base = {"optimizer": {"plugin": "adamw", "lr": 1e-3}, "loss": {"plugin": "cross_entropy"}}
    space = parse_space({"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
                         "loss": {"type": "categorical", "choices": [{"plugin": "focal", "gamma": 2.0},
                                                                     {"plugin": "cross_entropy"}]}}, base)
    assert space["loss"].labels == ["{plugin = 'focal', gamma = 2.0}", "cross_entropy"]

    def run():
        tuner = get_registry().build("tuner", {"plugin": "optuna", "n_startup_trials": 3}, "tune")
        tuner.bind(space, "maximize", seed=0)
        return tuner.optimize(lambda v: -abs(v["optimizer.lr"] - 0.01) + (v["loss"]["plugin"] == "focal"), 8)

    a, b = run(), run()
    assert a["best_params"] == b["best_params"] and a["best_params"]["loss"] == {"plugin": "focal", "gamma": 2.0}


# ------------------------------------------------------------------ studies


def test_study_writes_best_recipe_and_continues(write_recipe, tmp_path, capsys):
    recipe, study = tune_recipe(write_recipe), tmp_path / "study"
    code, out, err = fer("tune", recipe, "--trials", 2, "--study-dir", study, capsys=capsys)
    assert code == 0, err
    assert "trial 1/2 (#0): optimizer.lr=" in err and "trial 2/2 (#1): macro_f1 " in err  # progress on stderr
    assert f"best recipe: {study / 'best.toml'}" in out and "complete" in out  # the table, on stdout
    first = summary(study)
    assert [t["state"] for t in first["trials"]] == ["COMPLETE", "COMPLETE"]
    assert all(t["epochs_run"] == 1 and set(t["params"]) == {"optimizer.lr", "model.heads.emotion.dropout"}
               for t in first["trials"])
    assert {p.name for p in study.glob("*.png")} == {"optimization_history.png", "intermediate_values.png",
                                                     "parallel_coordinate.png", "param_importances.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in study.glob("*.png"))
    for t in first["trials"]:  # each trial a real run with its resolved recipe and the trial's values
        saved = (study / t["dir"] / "recipe.toml").read_text()
        assert f"lr = {t['params']['optimizer.lr']!r}" in saved and (study / t["dir"] / "best.pt").is_file()

    # best.toml: the winner's values, no [tune] table, no pruning callback; `fer run` accepts it
    from fer_core.api import read_toml, validate

    best = read_toml(study / "best.toml")
    winner = first["trials"][first["best_trial"]]
    assert "tune" not in best and best["callbacks"] == []
    assert best["optimizer"]["lr"] == winner["params"]["optimizer.lr"]
    assert best["model"]["heads"]["emotion"]["dropout"] == winner["params"]["model.heads.emotion.dropout"]
    validate(best, "best.toml")

    # the same command with a higher budget continues the study: earlier trials kept as they were
    code, out, err = fer("tune", recipe, "--trials", 3, "--study-dir", study, capsys=capsys)
    assert code == 0, err
    assert "1 more trial(s) of 3" in err and "trial 3/3 (#2)" in err
    again = summary(study)
    assert again["trials"][:2] == first["trials"] and again["trials"][2]["state"] == "COMPLETE"
    assert again["trials"][2]["params"] not in [t["params"] for t in first["trials"]]  # seeded per trial number
    # a study refuses to continue with another search
    code, _, err = fer("tune", recipe, "--trials", 4, "--study-dir", study, "-o", "train.epochs=2", capsys=capsys)
    assert code == 2 and "train.epochs" in err and len(summary(study)["trials"]) == 3


def test_crashing_trial_is_recorded_and_the_study_goes_on(write_recipe, tmp_path, capsys):
    """lr 1e30 makes the loss NaN (the engine's guard raises a FerError): that trial fails with
    its reason, the other one completes and wins."""
    recipe = tune_recipe(write_recipe, '"optimizer.lr" = { type = "categorical", choices = [1e30, 0.003] }',
                         tune='sampler = "grid"')
    study = tmp_path / "study"
    code, out, err = fer("tune", recipe, "--trials", 2, "--study-dir", study, capsys=capsys)
    assert code == 0, err
    trials = {t["params"]["optimizer.lr"]: t for t in summary(study)["trials"]}
    assert trials[1e30]["state"] == "FAIL" and "loss became nan" in trials[1e30]["reason"]
    assert trials[0.003]["state"] == "COMPLETE" and summary(study)["best_params"] == {"optimizer.lr": 0.003}
    assert "failed: loss became nan" in err and "fail" in out
    assert "param_importances: needs at least 2 complete trials" in err  # skipped, not an error


def test_pruning_stops_a_trial_at_an_epoch_end(write_recipe, tmp_path, capsys):
    """A threshold no macro-F1 reaches: the trial is stopped after its first of two epochs."""
    recipe = tune_recipe(write_recipe, '"optimizer.lr" = { type = "float", low = 1e-3, high = 1e-2 }',
                         tune='pruner = "threshold"\nlower = 1.01', epochs=2)
    study = tmp_path / "study"
    code, out, err = fer("tune", recipe, "--trials", 1, "--study-dir", study, capsys=capsys)
    assert code == 2 and "no trial completed (1 pruned, 0 failed)" in err, err
    (t,) = summary(study)["trials"]
    assert t["state"] == "PRUNED" and t["epochs_run"] == 1 and list(t["intermediate"]) == ["1"]
    assert t["reason"].startswith("pruned at epoch 1 (macro_f1 ")
    assert t["value"] == t["intermediate"]["1"]
    run = json.loads((study / t["dir"] / "run.json").read_text())
    assert run["status"] == "pruned" and run["pruned_at_epoch"] == 1
    log = (study / t["dir"] / "train.log").read_text()
    assert "epoch 1:" in log and "epoch 2:" not in log  # epoch 1 complete (logged, checkpointed), no epoch 2
    import torch

    assert torch.load(study / t["dir"] / "last.pt", weights_only=False)["train_state"]["epoch"] == 1
    assert not (study / "best.toml").exists()


def test_killed_trial_is_failed_and_resumed_from_its_checkpoint(write_recipe, tmp_path, capsys):
    """SIGKILL during trial #0's second epoch; the same command marks it failed (interrupted) and
    retries its values as trial #1, resuming its directory after epoch 1."""
    recipe, study = tune_recipe(write_recipe, epochs=3), tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "fer_core.cli", "tune", str(recipe), "--trials", "1",
                             "--study-dir", str(study)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (study / "trial-0000" / "last.pt").is_file():
            assert proc.poll() is None and time.time() < deadline, "the trial never reached its first checkpoint"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    code, out, err = fer("tune", recipe, "--trials", 1, "--study-dir", study, capsys=capsys)
    assert code == 0, err
    assert "trial #0 was running when its process stopped" in err and "resuming interrupted trial #0" in err
    first, retry = summary(study)["trials"]
    assert first["state"] == "FAIL" and first["reason"].startswith("interrupted")
    assert retry["state"] == "COMPLETE" and retry["params"] == first["params"] and retry["resumes"] == 0
    assert retry["epochs_run"] == 3 and list(retry["intermediate"]) == ["1", "2", "3"]
    assert not (study / "trial-0000").exists() and (study / "trial-0001" / "best.pt").is_file()
    log = (study / "trial-0001" / "train.log").read_text()
    assert "(resumed)" in log


def test_two_workers_share_one_study(write_recipe, tmp_path, capsys):
    """--workers 2: two processes, one journal file, distinct trials adding up to the budget, each
    training with cores // 2 threads."""
    recipe, study = tune_recipe(write_recipe), tmp_path / "study"
    code, out, err = fer("tune", recipe, "--trials", 4, "--workers", 2, "--study-dir", study,
                         "-o", "data.max_train_per_class=4", capsys=capsys)
    assert code == 0, err
    trials = summary(study)["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3] and all(t["state"] == "COMPLETE" for t in trials)
    assert {t["worker"] for t in trials} == {0, 1}
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials}) == 4
    cores = len(os.sched_getaffinity(0))
    for t in trials:
        assert f"threads = {max(1, cores // 2)}" in (study / t["dir"] / "recipe.toml").read_text()
