"""Value ranges: every recipe value is checked before anything is built or trained.

Ranges live in the types of the factory signatures (pydantic ``Annotated[..., Field(...)]``) and
of the core's sections; a recipe that training would die on, or worse run with (a negative
learning rate, dropout 1.5, ``epochs = true``), fails ``fer recipe check`` with one line naming
the key. Booleans are never taken for numbers, nor numbers for booleans; an int where a float is
wanted is fine (``lr = 1``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fer_core.errors import FerError
from fer_core.recipe import load

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.toml"
RECIPES = sorted((REPO / "recipes").rglob("*.toml"))
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}

# plugin switches for the quickstart recipe (its other keys stay valid under each)
SGD = ['optimizer.plugin="sgd"']
WARMUP = ['schedule.plugin="warmup_cosine"']
STEP = ['schedule.plugin="step"']
MLP = ['model.heads.emotion.plugin="mlp"']
ALB = ['augment.plugin="albumentations"']
FOCAL = ['loss.plugin="focal"']
SMOOTH = ['loss.plugin="label_smoothing"']
WCE = ['loss.plugin="weighted_cross_entropy"']
TTA = ['tta.plugin="standard"']
SAMPLER = ['sampler.plugin="oversample"']
RAFDB = ['data.plugin="rafdb"']
RAFCE = ['data.plugin="rafce"']
FOLDER = ['data.plugin="folder"']


def mix(**params: object) -> list[str]:
    """One batch transform; values as TOML text."""
    body = ", ".join(["plugin = " + '"' + str(params.pop("plugin", "mix")) + '"']
                     + [f"{k} = {v}" for k, v in params.items()])
    return [f"batch_transforms=[{{{body}}}]"]


BAD = [
    # ---- the reported cases
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["optimizer.lr=nan"], "optimizer.lr"),
    (["optimizer.lr=inf"], "optimizer.lr"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["schedule.min_lr=-1e-4"], "schedule.min_lr"),  # cosine: would train by gradient ascent
    (WARMUP + ["schedule.min_lr=-1e-4"], "schedule.min_lr"),
    (["model.heads.emotion.dropout=1.5"], "model.heads.emotion.dropout"),
    (["model.heads.emotion.dropout=1"], "model.heads.emotion.dropout"),
    (["model.heads.emotion.dropout=-0.1"], "model.heads.emotion.dropout"),
    (["augment.hflip=2"], "augment.hflip"),
    (ALB + ["augment.hflip=2"], "augment.hflip"),
    (["train.batch_size=-8"], "train.batch_size"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.num_workers=-1"], "train.num_workers"),
    (["train.epochs=true"], "train.epochs"),
    (["train.epochs=0"], "train.epochs"),
    # ---- train
    (["train.epochs=2.5"], "train.epochs"),
    (["train.batch_size=true"], "train.batch_size"),
    (["train.eval_batch_size=-1"], "train.eval_batch_size"),
    (["train.threads=-2"], "train.threads"),
    (["train.clip_grad_norm=-1"], "train.clip_grad_norm"),
    (["train.clip_grad_norm=inf"], "train.clip_grad_norm"),
    (["train.clip_grad_norm=nan"], "train.clip_grad_norm"),
    (["train.clip_grad_norm=true"], "train.clip_grad_norm"),
    (["train.accumulate_steps=0"], "train.accumulate_steps"),
    (["train.early_stopping_patience=-1"], "train.early_stopping_patience"),
    (["train.num_workers=true"], "train.num_workers"),
    (['train.num_workers="many"'], "train.num_workers"),
    (["train.seed=true"], "train.seed"),
    (["train.compile=1"], "train.compile"),
    (['train.deterministic="yes"'], "train.deterministic"),
    (["train.pin_memory=1"], "train.pin_memory"),
    (["tracking.enabled=0"], "tracking.enabled"),
    # ---- data (core keys, then dataset plugins)
    (["data.val_fraction=0"], "data.val_fraction"),
    (["data.val_fraction=1"], "data.val_fraction"),
    (["data.val_fraction=nan"], "data.val_fraction"),
    (["data.val_fraction=true"], "data.val_fraction"),
    (["data.max_train_per_class=-1"], "data.max_train_per_class"),
    (["data.max_train_per_class=false"], "data.max_train_per_class"),
    (["data.cache_images=1"], "data.cache_images"),
    (["data.skip_missing=0"], "data.skip_missing"),
    (['data.root=""'], "data.root"),
    (FOLDER + ['data.root=""'], "data.root"),
    (RAFDB + ["data.aligned=1"], "data.aligned"),
    (RAFCE + ["data.use_au=0"], "data.use_au"),
    # ---- optimizers
    (["optimizer.lr=true"], "optimizer.lr"),
    (["optimizer.weight_decay=-0.01"], "optimizer.weight_decay"),
    (["optimizer.betas=[0.9, 1.0]"], "optimizer.betas"),
    (["optimizer.betas=[-0.1, 0.999]"], "optimizer.betas"),
    (SGD + ["optimizer.momentum=1"], "optimizer.momentum"),
    (SGD + ["optimizer.momentum=-0.5"], "optimizer.momentum"),
    (SGD + ["optimizer.nesterov=1"], "optimizer.nesterov"),
    (SGD + ["optimizer.lr=-0.1"], "optimizer.lr"),
    # ---- schedules
    (["schedule.min_lr=nan"], "schedule.min_lr"),
    (WARMUP + ["schedule.warmup_epochs=-1"], "schedule.warmup_epochs"),
    (WARMUP + ["schedule.warmup_steps=-1"], "schedule.warmup_steps"),
    (WARMUP + ["schedule.warmup_start_factor=1.5"], "schedule.warmup_start_factor"),
    (STEP + ["schedule.step_size=0"], "schedule.step_size"),
    (STEP + ["schedule.gamma=-0.1"], "schedule.gamma"),
    (STEP + ["schedule.step_size=true"], "schedule.step_size"),
    # ---- heads
    (MLP + ["model.heads.emotion.hidden=0"], "model.heads.emotion.hidden"),
    (MLP + ["model.heads.emotion.dropout=1.5"], "model.heads.emotion.dropout"),
    # ---- losses
    (["loss.class_weights=[1, -1, 1, 1, 1, 1, 1]"], "loss.class_weights"),
    (FOCAL + ["loss.gamma=-1"], "loss.gamma"),
    (FOCAL + ["loss.gamma=inf"], "loss.gamma"),
    (FOCAL + ["loss.alpha=[1, 1, -0.5]"], "loss.alpha"),
    (SMOOTH + ["loss.smoothing=1"], "loss.smoothing"),
    (SMOOTH + ["loss.smoothing=-0.1"], "loss.smoothing"),
    (WCE + ["loss.beta=1"], "loss.beta"),
    (WCE + ["loss.weights=[1, 0, 1]"], "loss.weights"),
    # ---- augmenters
    (["augment.hflip=true"], "augment.hflip"),
    (ALB + ["augment.vflip=-0.1"], "augment.vflip"),
    (ALB + ["augment.dropout_p=1.01"], "augment.dropout_p"),
    (ALB + ["augment.crop_scale=0.5"], "augment.crop_scale"),
    (ALB + ["augment.rotate_limit=-10"], "augment.rotate_limit"),
    (ALB + ["augment.scale=1"], "augment.scale"),
    (ALB + ["augment.shift=2"], "augment.shift"),
    (ALB + ["augment.hue=181"], "augment.hue"),
    (ALB + ["augment.saturation=-1"], "augment.saturation"),
    (ALB + ["augment.noise_std=[0.1, 2]"], "augment.noise_std"),
    (ALB + ["augment.blur_limit=1"], "augment.blur_limit"),
    (ALB + ["augment.elastic_sigma=0"], "augment.elastic_sigma"),
    (ALB + ["augment.grid_distort=1.5"], "augment.grid_distort"),
    (ALB + ["augment.dropout_holes=0"], "augment.dropout_holes"),
    (ALB + ["augment.dropout_size=0"], "augment.dropout_size"),
    (ALB + ["augment.dropout_size=1.5"], "augment.dropout_size"),
    # ---- batch transforms
    (mix(prob=2), r"batch_transforms[0].prob"),
    (mix(prob="true"), r"batch_transforms[0].prob"),
    (mix(switch_prob=-0.1), r"batch_transforms[0].switch_prob"),
    (mix(mixup_alpha=-1), r"batch_transforms[0].mixup_alpha"),
    (mix(plugin="mixup", alpha="nan"), r"batch_transforms[0].alpha"),
    (mix(plugin="cutmix", off_last_epochs=-1), r"batch_transforms[0].off_last_epochs"),
    (mix(seed=1.5), r"batch_transforms[0].seed"),
    # ---- samplers
    (SAMPLER + ["sampler.power=-1"], "sampler.power"),
    (SAMPLER + ["sampler.power=nan"], "sampler.power"),
    (SAMPLER + ["sampler.num_samples=-5"], "sampler.num_samples"),
    # ---- test-time augmentation
    (TTA + ["tta.crop_fraction=0"], "tta.crop_fraction"),
    (TTA + ["tta.crop_fraction=1.5"], "tta.crop_fraction"),
    (TTA + ["tta.scales=[1.2, 0]"], "tta.scales"),
    (TTA + ["tta.crops=true"], "tta.crops"),
    (TTA + ["tta.crops=2"], "tta.crops"),
    (TTA + ["tta.hflip=1"], "tta.hflip"),
]


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_out_of_range_values_fail_validation_naming_the_key(overrides, key):
    with pytest.raises(FerError) as e:
        load(QUICKSTART, overrides)
    message = str(e.value)
    # one line: "<file>: <key>: <what is wrong> (got <value>)"
    assert "\n" not in message
    assert re.match(rf"{re.escape(str(QUICKSTART))}: {re.escape(key)}\b", message), message
    assert "(got " in message, message


GOOD = [
    (["optimizer.lr=1"], ("optimizer", "lr"), 1.0),  # an int where a float is wanted
    (["optimizer.weight_decay=0"], ("optimizer", "weight_decay"), 0.0),
    (SGD + ["optimizer.momentum=0"], ("optimizer", "momentum"), 0.0),
    (["schedule.min_lr=0"], ("schedule", "min_lr"), 0.0),
    (["augment.hflip=1"], ("augment", "hflip"), 1.0),
    (["augment.hflip=0"], ("augment", "hflip"), 0.0),
    (["model.heads.emotion.dropout=0"], ("model", "heads", "emotion", "dropout"), 0.0),
    (["train.clip_grad_norm=1"], ("train", "clip_grad_norm"), 1.0),
    (["train.num_workers=0"], ("train", "num_workers"), 0),
    (['train.num_workers="auto"'], ("train", "num_workers"), "auto"),
    (["train.pin_memory=false"], ("train", "pin_memory"), False),
    (["train.eval_batch_size=0"], ("train", "eval_batch_size"), 0),
    (["train.threads=0"], ("train", "threads"), 0),
    (["train.seed=-1"], ("train", "seed"), -1),
    (["data.val_fraction=0.5"], ("data", "val_fraction"), 0.5),
    (['data.root="/tmp"'], ("data", "root"), "/tmp"),
    (WARMUP + ["schedule.warmup_epochs=0"], ("schedule", "warmup_epochs"), 0.0),
    (WARMUP + ["schedule.warmup_start_factor=1"], ("schedule", "warmup_start_factor"), 1.0),
    (STEP + ["schedule.gamma=0.5"], ("schedule", "gamma"), 0.5),
    (SMOOTH + ["loss.smoothing=0"], ("loss", "smoothing"), 0.0),
    (FOCAL + ["loss.alpha=[1, 0, 2]"], ("loss", "alpha"), [1.0, 0.0, 2.0]),
    (ALB + ["augment.noise_std=[0, 1]"], ("augment", "noise_std"), [0.0, 1.0]),
    (ALB + ["augment.hue=0"], ("augment", "hue"), 0),
    (TTA + ["tta.crops=5", "tta.scales=[0.8, 1]"], ("tta", "scales"), [0.8, 1.0]),
    (SAMPLER + ["sampler.power=0"], ("sampler", "power"), 0.0),
    (mix(prob=1, mixup_alpha=0), ("batch_transforms", 0, "mixup_alpha"), 0.0),
]


@pytest.mark.parametrize("overrides, path, value", GOOD, ids=[" ".join(o) for o, _, _ in GOOD])
def test_edge_values_inside_the_range_pass(overrides, path, value):
    _, raw = load(QUICKSTART, overrides)
    node = raw
    for part in path:
        node = node[part]
    assert node == value and type(node) is type(value), (node, value)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_every_shipped_recipe_still_validates(path):
    if {"members", "tune"} & set(tomllib.loads(path.read_text(encoding="utf-8"))):
        pytest.skip("an ensemble or tuning recipe (validated by its plugin: tests/test_recipe.py)")
    recipe, raw = load(path)
    assert raw["train"]["epochs"] >= 1


# --------------------------------------------------------------------------- through the CLI


def fer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fer_core.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=300)


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=-1", "optimizer.lr"),
    ("train.epochs=true", "train.epochs"),
    ("augment.hflip=2", "augment.hflip"),
])
def test_recipe_check_exits_2_with_one_line(override, key):
    r = fer("recipe", "check", "recipes/quickstart.toml", "-o", override)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f" {key}" in lines[0] and "quickstart.toml" in lines[0], r.stderr
