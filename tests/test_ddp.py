"""`fer run --nproc 2`: data-parallel training through torchrun (gloo on this CPU) on real faces.

What DDP must not change: the global batch (train.batch_size) is split across the processes,
so two processes follow the single-process run step for step (within float rounding); every
validation image is predicted exactly once; only rank 0 writes; the checkpoint resumes in one
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FER2013, REPO, needs_fer2013

pytestmark = [needs_fer2013, pytest.mark.slow]

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
#: relative tolerance on the per-epoch training loss and validation metrics of 1 vs 2 processes:
#: the gradient of a split batch is averaged in a different order (fp32 rounding, ~1e-7 per
#: step), which two epochs of Adam amplify to ~1e-5; a wrong split or a double-counted image
#: moves the loss by > 1e-2
RTOL = 1e-3


def deterministic_recipe(tmp_path: Path, labels: Path, **train) -> Path:
    """No BatchNorm (per-process batch statistics would differ from one process: ConvNeXt uses
    LayerNorm), no random augmentation, no dropout: one process and two must then agree."""
    t = {"epochs": 2, "batch_size": 8, "seed": 0, "device": "cpu", "precision": "fp32", "threads": 1, **train}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in t.items())
    p = tmp_path / "ddp.toml"
    p.write_text(f"""
name = "ddp"
[data]
plugin = "csv"
root = "{FER2013}"
labels = "{labels}"
[model.backbone]
plugin = "timm"
name = "test_convnext"
pretrained = false
in_chans = 1
input_size = 32
[model.heads.emotion]
plugin = "linear"
[optimizer]
plugin = "adamw"
lr = 0.003
[augment]
plugin = "basic"
hflip = 0.0
[train]
{lines}
[tracking]
enabled = false
""")
    return p


def fer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fer_core", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fer_subset):
    """The same recipe trained in one process and in two."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = deterministic_recipe(tmp, fer_subset)
    one, two = tmp / "one", tmp / "two"
    r1 = fer("run", recipe, "--out", one)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = fer("run", recipe, "--out", two, "--nproc", 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    return recipe, one, two, r2


def history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def test_two_processes_follow_the_single_process_run(runs):
    _, one, two, _ = runs
    h1, h2 = history(one), history(two)
    assert [r["epoch"] for r in h2] == [1, 2]
    for a, b in zip(h1, h2):
        for key in ("train_loss", "val_accuracy", "val_macro_f1"):
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-6), (key, a[key], b[key])
    # a loss that moved at all (otherwise agreement would prove nothing)
    assert h1[1]["train_loss"] < h1[0]["train_loss"]


def test_every_validation_image_counts_once(runs, fer_subset):
    _, one, two, _ = runs
    n_val = sum(1 for line in fer_subset.read_text().splitlines()[1:] if line.endswith(",val"))
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert m2["num_samples"] == n_val == m1["num_samples"]
    assert sum(map(sum, m2["confusion_matrix"])) == n_val
    assert m2["confusion_matrix"] == m1["confusion_matrix"]


def test_only_rank_zero_talks_and_writes(runs):
    _, _, two, r2 = runs
    assert r2.stdout.count("run directory:") == 1  # one summary, not one per process
    assert "Traceback" not in r2.stderr
    assert sorted(p.name for p in two.iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]
    assert json.loads((two / "run.json").read_text())["status"] == "finished"


def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    _, _, two, _ = runs
    r = fer("run", "--resume", two, "-o", "train.epochs=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [h["epoch"] for h in history(two)] == [1, 2, 3]


def test_accumulation_under_two_processes(tmp_path, fer_subset):
    """Two micro-batches per optimizer step (gradients synchronised only on the second), each
    split across the processes: the same steps as accumulation in one process."""
    recipe = deterministic_recipe(tmp_path, fer_subset, epochs=1, batch_size=4, accumulate_steps=2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert fer("run", recipe, "--out", one).returncode == 0
    r = fer("run", recipe, "--out", two, "--nproc", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = history(one)[0], history(two)[0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=RTOL)
    assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-6)


def test_a_batch_that_does_not_split_is_refused_in_one_line(tmp_path, fer_subset):
    recipe = deterministic_recipe(tmp_path, fer_subset, batch_size=7)
    r = fer("run", recipe, "--out", tmp_path / "run", "--nproc", 2)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["error: train.batch_size: 7 is the global batch and must divide by the 2 processes"], r.stderr
    assert not (tmp_path / "run").exists()
