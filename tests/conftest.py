"""Shared fixtures: real FER2013 faces from ../shared/data, one MLflow store per session."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test workers share the cores: one compute thread each, also in the `fer` processes
    # they start (OpenMP threads of concurrent trainings that each use every core thrash)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4 (each holds torch and cached faces in memory)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
FER2013 = SHARED_DATA / "fer2013"
CKPLUS = SHARED_DATA / "ckplus48_au"

needs_fer2013 = pytest.mark.skipif(not (FER2013 / "labels.csv").is_file(), reason="../shared/data/fer2013 not present")


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite store for the whole session (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def one_thread():
    """Opt-in for modules of tiny-tensor tests: intra-op threads only add contention there
    (10-100x slower on a loaded machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fer_subset(tmp_path_factory) -> Path:
    """A labels CSV naming a small, fixed subset of the real FER2013 images (10 train + 5 val
    per class); the images stay in ../shared/data."""
    if not (FER2013 / "labels.csv").is_file():
        pytest.skip("../shared/data/fer2013 not present")
    rows = list(csv.DictReader((FER2013 / "labels.csv").open()))
    rng = random.Random(0)
    rng.shuffle(rows)
    picked, counts = [], {}
    for r in rows:
        key = (r["split"], r["label"])
        limit = 10 if r["split"] == "train" else 5
        if counts.get(key, 0) < limit:
            counts[key] = counts.get(key, 0) + 1
            picked.append(r)
    out = tmp_path_factory.mktemp("fer_subset") / "labels.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "label_id", "split"])
        w.writeheader()
        for r in sorted(picked, key=lambda r: (r["split"], int(r["label_id"]), r["path"])):
            w.writerow({k: r[k] for k in ("path", "label", "label_id", "split")})
    return out


def tiny_recipe(labels: Path, mlflow_uri: str | None, **train) -> str:
    """A seconds-long recipe over the real-image subset: tiny CNN at 32×32 on CPU."""
    t = {"epochs": 2, "batch_size": 16, "seed": 0, "device": "cpu", "precision": "fp32", **train}
    train_lines = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in t.items())
    tracking = (f'[tracking]\nplugin = "mlflow"\nuri = "{mlflow_uri}"\nexperiment = "tests"\n'
                if mlflow_uri else "[tracking]\nenabled = false\n")
    return f"""
name = "tiny"
[data]
plugin = "csv"
root = "{FER2013}"
labels = "{labels}"
[model.backbone]
plugin = "timm"
name = "resnet10t"
in_chans = 1
input_size = 32
[model.heads.emotion]
plugin = "linear"
[optimizer]
plugin = "adamw"
lr = 0.003
[schedule]
plugin = "cosine"
[augment]
plugin = "basic"
[train]
{train_lines}
{tracking}
"""


@pytest.fixture
def write_recipe(tmp_path, fer_subset, mlflow_uri):
    def write(name: str = "recipe.toml", tracking: bool = False, **train) -> Path:
        p = tmp_path / name
        p.write_text(tiny_recipe(fer_subset, mlflow_uri if tracking else None, **train))
        return p

    return write
