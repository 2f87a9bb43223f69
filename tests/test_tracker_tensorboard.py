"""The TensorBoard tracker: `fer run` on real FER2013 faces, the event files read back with
TensorBoard's own reader; a resumed run appends each epoch once; keys are checked up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_recipe
from fer_core.api import FerError, RunInfo, get_registry

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
TRACKING = '[tracking]\nplugin = "tensorboard"\n'


def fer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fer_core.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=600)


def recipe(tmp_path: Path, labels: Path, schedule: bool = True, **train) -> Path:
    text = tiny_recipe(labels, None, threads=1, **train).replace("[tracking]\nenabled = false\n", TRACKING)
    if not schedule:  # a run whose epochs a resume may extend
        text = text.replace('[schedule]\nplugin = "cosine"\n', "")
    p = tmp_path / "recipe.toml"
    p.write_text(text)
    return p


def events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def text(acc, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def test_a_run_logs_epochs_final_metrics_recipe_and_confusion_matrix(tmp_path, fer_subset):
    out = tmp_path / "run"
    r = fer("run", str(recipe(tmp_path, fer_subset, epochs=2)), "--out", str(out))
    assert r.returncode == 0, r.stderr
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    acc = events(out / "tensorboard")
    assert [row["epoch"] for row in history] == [1, 2]
    for key, tag in [("val_accuracy", "val/accuracy"), ("val_macro_f1", "val/macro_f1"),
                     ("train_loss", "train/loss"), ("lr", "train/lr")]:
        steps, values = zip(*scalars(acc, tag))
        assert steps == (1, 2), tag
        assert values == pytest.approx([row[key] for row in history], rel=1e-6), tag  # float32 in the event
    assert scalars(acc, "final/accuracy") == [(2, pytest.approx(metrics["accuracy"], rel=1e-6))]
    assert scalars(acc, "final/macro_f1") == [(2, pytest.approx(metrics["macro_f1"], rel=1e-6))]
    [image] = acc.Images("val/confusion_matrix")
    assert image.step == 2 and image.encoded_image_string[:4] == b"\x89PNG" and image.width > 100
    [(step, toml)] = text(acc, "recipe")
    assert step == 0 and 'name = "resnet10t"' in toml and 'plugin = "tensorboard"' in toml

    # the recipe, flattened, on the HPARAMS dashboard of this same run (no sub-run directory)
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model.backbone.name"].string_value == "resnet10t"
    assert start.hparams["train.epochs"].number_value == 2
    assert [p.name for p in (out / "tensorboard").iterdir() if p.is_dir()] == []


def test_a_resumed_run_appends_to_the_same_log_with_each_epoch_once(tmp_path, fer_subset):
    out = tmp_path / "run"
    r = fer("run", str(recipe(tmp_path, fer_subset, schedule=False, epochs=1)), "--out", str(out))
    assert r.returncode == 0, r.stderr
    first = json.loads((out / "metrics.json").read_text())
    r = fer("run", "--resume", str(out), "-o", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout + r.stderr
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per session, one dir
    acc = events(out / "tensorboard")
    for key, tag in [("val_accuracy", "val/accuracy"), ("train_loss", "train/loss"), ("lr", "train/lr")]:
        steps, values = zip(*scalars(acc, tag))
        assert steps == (1, 2), tag
        assert values == pytest.approx([row[key] for row in history], rel=1e-6), tag
    # the 1-epoch run's final summary (step 1) was superseded: only the resumed run's, at step 2
    assert scalars(acc, "final/accuracy") == [(2, pytest.approx(metrics["accuracy"], rel=1e-6))]
    assert [i.step for i in acc.Images("val/confusion_matrix")] == [2]
    recipes = text(acc, "recipe")
    assert [s for s, _ in recipes] == [0, 1] and "resumed after epoch 1" in recipes[1][1]
    assert "epochs = 1" in recipes[0][1] and "epochs = 2" in recipes[1][1]
    assert first["epochs_run"] == 1 and metrics["epochs_run"] == 2


def _session(log_dir: Path, out: Path, resumed: bool, state: dict | None, epochs: dict[int, float]) -> dict:
    """One fer process as the engine drives the tracker; returns its state at the last checkpoint."""
    cb = get_registry().build("callback", {"plugin": "tensorboard", "log_dir": str(log_dir)}, "tracking")
    if state is not None:
        cb.load_state_dict(state)
    run = RunInfo(out_dir=out, recipe={"name": "t", "train": {"epochs": 3}}, classes=["a", "b"], resumed=resumed)
    cb.on_fit_start(run)
    saved = cb.state_dict()
    for epoch, value in epochs.items():
        cb.on_epoch_end(run, epoch, {"epoch": epoch, "train_loss": value, "lr": 0.1, "val_accuracy": value})
        saved = json.loads(json.dumps(cb.state_dict()))  # what last.pt keeps
    return {"cb": cb, "run": run, "saved": saved}


def test_a_crash_after_an_epoch_was_logged_is_purged_on_resume(tmp_path):
    log, out = tmp_path / "tb", tmp_path / "run"
    out.mkdir()
    s1 = _session(log, out, False, None, {1: 0.1, 2: 0.2})
    checkpointed = {"epoch": 1, "row": {"epoch": 1, "train_loss": 0.1, "lr": 0.1, "val_accuracy": 0.1}}
    assert s1["saved"]["epoch"] == 2
    s1["cb"].on_exception(s1["run"], RuntimeError("killed before epoch 2's checkpoint"))
    (out / "last.pt").write_bytes(b"")  # the resume finds epoch 1's checkpoint
    s2 = _session(log, out, True, checkpointed, {2: 0.5, 3: 0.6})
    s2["cb"].on_fit_end(s2["run"], {"accuracy": 0.6, "epochs_run": 3})
    # a finished run resumed again only re-evaluates: the final summary is replaced, not doubled
    s3 = _session(log, out, True, s2["saved"], {})
    s3["cb"].on_fit_end(s3["run"], {"accuracy": 0.7, "epochs_run": 3})
    acc = events(log)
    assert scalars(acc, "val/accuracy") == [(1, pytest.approx(0.1)), (2, pytest.approx(0.5)), (3, pytest.approx(0.6))]
    assert [s for s, _ in scalars(acc, "train/loss")] == [1, 2, 3]
    assert scalars(acc, "final/accuracy") == [(3, pytest.approx(0.7))]


def test_keys_are_checked_before_anything_runs(tmp_path):
    reg = get_registry()
    with pytest.raises(FerError, match=r"tracking.log_dirr: unknown key for callback plugin 'tensorboard' "
                                       r"\(did you mean 'log_dir'\?\)"):
        reg.validate("callback", {"plugin": "tensorboard", "log_dirr": "x"}, "tracking")
    assert reg.validate("callback", {"plugin": "tensorboard"}, "tracking") == {"plugin": "tensorboard", "log_dir": ""}
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FerError, match=r"tracking.log_dir .*file is not a directory"):
        reg.build("callback", {"plugin": "tensorboard", "log_dir": str(blocker / "tb")}, "tracking")


def test_the_plugin_module_imports_no_tensorboard_until_a_run_starts():
    code = ("import sys, fer_plugins.tracker_tensorboard; "
            "print([m for m in ('tensorboard', 'torch.utils.tensorboard') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
