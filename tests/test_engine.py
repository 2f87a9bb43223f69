"""Resume equivalence, the NaN guard and atomic checkpoints, on real FER2013 faces."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from fer_core import checkpoint
from fer_core.errors import FerError, NonFiniteLossError
from fer_core.api import hookimpl
from fer_core.interfaces import Callback
from fer_core.registry import get_registry
from fer_core.runner import train


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Dies in the middle of an epoch, like a kill."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, run, epoch, batch, logs):
        if (epoch, batch) == (self.epoch, self.batch):
            raise Crash(f"simulated crash at epoch {epoch} batch {batch}")


class NanLoss:
    def __init__(self, after: int) -> None:
        self.calls, self.after = 0, after

    def __call__(self, outputs, batch):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(outputs["emotion"].float(), batch["label"])
        if self.calls > self.after:
            loss = loss * float("nan")
        return loss, {"emotion": loss.detach()}


class TestPlugin:
    @hookimpl
    def register_callbacks(self, register):
        register("test_crash", lambda *, epoch=2, batch=2: CrashAt(epoch, batch))

    @hookimpl
    def register_losses(self, register):
        register("test_nan_after", lambda task, /, *, after=6: NanLoss(after))


@pytest.fixture(scope="module", autouse=True)
def test_plugins():
    reg = get_registry()
    if "test_crash" not in reg.components["callback"]:
        reg.add_plugin(TestPlugin(), "engine_test_plugins")


def with_callback(path, text):
    path.write_text(path.read_text() + text)
    return path


def test_resume_after_a_crash_ends_with_the_same_metrics(write_recipe, tmp_path):
    # precision=auto also proves bf16 autocast (where native) keeps resume exact
    recipe = write_recipe(epochs=3, precision="auto", accumulate_steps=2, clip_grad_norm=1.0)
    _, straight = train(recipe, [], tmp_path / "straight", None)

    crashing = with_callback(write_recipe("crash.toml", epochs=3, precision="auto", accumulate_steps=2,
                                          clip_grad_norm=1.0),
                             '\n[[callbacks]]\nplugin = "test_crash"\nepoch = 2\nbatch = 2\n')
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(crashing, [], out, None)
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert checkpoint.load(out / "last.pt")["train_state"]["epoch"] == 1
    assert not (out / "metrics.json").exists()

    # continue without the crashing callback
    _, resumed = train(None, ["callbacks=[]"], None, out)
    assert resumed["accuracy"] == straight["accuracy"]
    assert resumed["macro_f1"] == straight["macro_f1"]
    assert resumed["confusion_matrix"] == straight["confusion_matrix"]
    a = checkpoint.load(tmp_path / "straight" / "last.pt")
    b = checkpoint.load(out / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["train_state"]["history"][-1]["train_loss"] == b["train_state"]["history"][-1]["train_loss"]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # each epoch's wall time (training + validation) is kept once, across the crash: a run's compute
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(h["epoch_wall_seconds"] > h["epoch_seconds"] > 0 for h in history)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(write_recipe, tmp_path):
    recipe = with_callback(write_recipe(epochs=3), "")
    text = recipe.read_text().replace("[optimizer]", '[loss]\nplugin = "test_nan_after"\nafter = 5\n\n[optimizer]')
    recipe.write_text(text)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, batch 2.*epoch 1"):
        train(recipe, [], out, None)
    ck = checkpoint.load(out / "last.pt")
    assert ck["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_existing_run_directory_is_not_overwritten(write_recipe, tmp_path):
    recipe = write_recipe(epochs=1)
    train(recipe, [], tmp_path / "r", None)
    before = (tmp_path / "r" / "last.pt").read_bytes()
    with pytest.raises(FerError, match="already holds a run; continue it with `fer run --resume"):
        train(recipe, [], tmp_path / "r", None)
    assert (tmp_path / "r" / "last.pt").read_bytes() == before


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    checkpoint.save(target, {"x": torch.ones(3)})
    good = target.read_bytes()

    def broken_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left") as e:
        checkpoint.save(target, {"x": torch.zeros(3)})
    assert e.value.filename == str(target)  # the one-line message can name the file
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_checkpoints_refuse_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(FerError, match="not a readable fer checkpoint"):
        checkpoint.load(bad)


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(write_recipe, tmp_path):
    # a monitored value that cannot change (the validation size) never improves after epoch 1
    recipe = write_recipe(epochs=5, early_stopping_patience=2, monitor="num_samples")
    _, final = train(recipe, [], tmp_path / "es", None)
    ck = checkpoint.load(tmp_path / "es" / "last.pt")
    assert ck["train_state"]["epoch"] == 3 and ck["callback_state"]["stopped_early_at"] == 3
    assert final["best_epoch"] == 1 and final["epochs_run"] == 3
    _, again = train(None, [], None, tmp_path / "es")  # resuming a finished run trains no further
    assert again["epochs_run"] == 3 and again["accuracy"] == final["accuracy"]


def test_stratified_validation_split_when_the_dataset_has_none():
    from pathlib import Path

    from fer_core.data import make_splits
    from fer_core.interfaces import DataSource, Sample

    samples = [Sample(Path(f"/x/{c}_{i}.png"), c) for c in range(3) for i in range([20, 10, 1][c])]
    src = DataSource(classes=["a", "b", "c"], splits={"train": samples})
    a = make_splits(src, train_split="train", val_split="val", val_fraction=0.2, seed=0, skip_missing=False,
                    check_files=False)
    b = make_splits(src, train_split="train", val_split="val", val_fraction=0.2, seed=0, skip_missing=False,
                    check_files=False)
    assert [s.path for s in a.val] == [s.path for s in b.val]  # deterministic for a seed
    assert {s.path for s in a.train}.isdisjoint({s.path for s in a.val})
    assert len(a.train) + len(a.val) == 31
    per_class = [sum(s.label == c for s in a.val) for c in range(3)]
    assert per_class == [4, 2, 0]  # 20 % of each class; a single-image class stays in train
