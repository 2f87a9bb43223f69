"""Groups, the one splitter (hold-out and folds), the `folds` dataset, `fer cv` and `fer repeat`
on real CK+ faces (subjects are the groups: frames of one subject must never sit on both sides)."""

from __future__ import annotations

import csv
import json
import random
import tomllib
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CKPLUS
from fer_core.api import FerError, Sample, get_registry
from fer_core.data import make_splits, stratified_split
from fer_plugins.crossval import cross_validate, folds, mean_std, parse_seeds, repeat_seeds
from fer_plugins.data_csv import make_csv_dataset
from fer_plugins.data_folder import make_folder_dataset

needs_ckplus = pytest.mark.skipif(not (CKPLUS / "labels.csv").is_file(), reason="../shared/data/ckplus48_au not present")


def ck_rows() -> list[dict[str, str]]:
    return list(csv.DictReader((CKPLUS / "labels.csv").open()))


def old_stratified_split(samples, fraction, seed):
    """The hold-out as it was before groups (runs made then must keep their splits)."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(items)
        n_val = int(round(len(items) * fraction))
        if len(items) >= 2:
            n_val = min(max(n_val, 1), len(items) - 1)
        else:
            n_val = 0
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return train, val


def synthetic(n_groups: int = 30, per_group: int = 6, classes: int = 4, seed: int = 0, grouped: bool = True):
    rng = random.Random(seed)
    return [Sample(Path(f"/x/g{g}_{i}.png"), rng.randrange(classes), group=f"g{g}" if grouped else None)
            for g in range(n_groups) for i in range(per_group)]


# ------------------------------------------------------------------ groups from the readers


@needs_ckplus
def test_csv_reader_takes_groups_from_a_column(tmp_path):
    src = make_csv_dataset(root=str(CKPLUS), group_column="subject")
    subject = {str((CKPLUS / r["path"]).resolve()): r["subject"] for r in ck_rows()}
    samples = [s for v in src.splits.values() for s in v]
    assert len(samples) == len(subject) and all(s.group == subject[str(s.path)] for s in samples)
    assert any("groups from 'subject': 118 distinct" in n for n in src.notes)
    assert all(s.group is None for v in make_csv_dataset(root=str(CKPLUS)).splits.values() for s in v)
    # the core's hold-out (no val split in CK+) is then subject-independent
    splits = make_splits(src, train_split="train", val_split="val", val_fraction=0.2, seed=0, skip_missing=False,
                         check_files=False)
    assert {s.group for s in splits.train}.isdisjoint({s.group for s in splits.val})
    assert 0.15 < len(splits.val) / (len(splits.train) + len(splits.val)) < 0.25
    (tmp_path / "l.csv").write_text("path,label,who\na.png,x,s1\nb.png,y,\n")
    s = make_csv_dataset(root=str(tmp_path), labels="l.csv", group_column="who").splits["train"]
    assert [x.group for x in s] == ["s1", None]  # an empty cell: no group
    with pytest.raises(FerError, match="group column 'whom' not found"):
        make_csv_dataset(root=str(tmp_path), labels="l.csv", group_column="whom")


def test_folder_reader_takes_groups_from_file_names(tmp_path):
    for cls, names in {"happy": ["S010_004_00000017.png", "S011_001_00000002.png"], "sad": ["S010_002_1.png"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            (tmp_path / cls / n).write_bytes(b"")  # the reader never opens images
    src = make_folder_dataset(root=str(tmp_path), group_pattern=r"^(S\d+)_")
    assert [(s.path.name, s.group) for s in src.splits["train"]] == [
        ("S010_004_00000017.png", "S010"), ("S011_001_00000002.png", "S011"), ("S010_002_1.png", "S010")]
    whole = make_folder_dataset(root=str(tmp_path), group_pattern=r"S\d+_\d+")  # no capture group: the match
    assert [s.group for s in whole.splits["train"]] == ["S010_004", "S011_001", "S010_002"]
    assert all(s.group is None for s in make_folder_dataset(root=str(tmp_path)).splits["train"])
    (tmp_path / "sad" / "odd.png").write_bytes(b"")
    with pytest.raises(FerError, match=r"odd\.png: file name does not match group_pattern"):
        make_folder_dataset(root=str(tmp_path), group_pattern=r"^(S\d+)_")
    with pytest.raises(FerError, match="not a valid regular expression"):
        make_folder_dataset(root=str(tmp_path), group_pattern="(")


# ------------------------------------------------------------------ one splitter


@pytest.mark.parametrize("fraction,seed", [(0.1, 0), (0.2, 3), (0.25, 7), (0.5, 1)])
def test_the_holdout_without_groups_is_unchanged(fraction, seed):
    samples = synthetic(n_groups=40, per_group=5, classes=7, seed=seed, grouped=False)
    samples += [Sample(Path("/x/lonely.png"), 7)]  # a class with one image stays in training
    assert stratified_split(samples, fraction, seed) == old_stratified_split(samples, fraction, seed)


@pytest.mark.parametrize("fraction,seed", [(0.1, 0), (0.2, 3), (0.34, 5)])
def test_the_holdout_with_groups_puts_no_group_on_both_sides(fraction, seed):
    samples = synthetic(seed=seed)
    train, val = stratified_split(samples, fraction, seed)
    assert len(train) + len(val) == len(samples) and {s.group for s in train}.isdisjoint({s.group for s in val})
    assert abs(len(val) / len(samples) - 1 / round(1 / fraction)) < 0.1
    # one splitter: the hold-out is the first of the folds made with k = round(1 / fraction)
    assert [str(s.path) for s in val] == [str(samples[i].path) for i in folds(samples, round(1 / fraction), seed)[0]]
    assert stratified_split(samples, fraction, seed) == (train, val)  # deterministic
    with pytest.raises(FerError, match="at least 2 groups"):
        stratified_split([Sample(Path(f"/x/{i}"), i % 2, group="one") for i in range(6)], 0.2, 0)


def test_folds_partition_the_pool_stratified_and_group_disjoint():
    plain = synthetic(n_groups=50, per_group=4, classes=5, grouped=False)
    parts = folds(plain, 5, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(len(plain)))
    totals = Counter(s.label for s in plain)
    for p in parts:  # stratified: every class in every fold in proportion (±1 image)
        got = Counter(plain[i].label for i in p)
        assert all(abs(got[c] - totals[c] / 5) <= 1 for c in totals)
    assert folds(plain, 5, seed=1) == parts and folds(plain, 5, seed=2) != parts
    grouped = synthetic(n_groups=20, per_group=5)
    parts = folds(grouped, 4, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(len(grouped)))
    sets = [{grouped[i].group for i in p} for p in parts]
    assert all(a.isdisjoint(b) for j, a in enumerate(sets) for b in sets[j + 1:])
    with pytest.raises(FerError, match="cannot make 25 folds of 20 groups"):
        folds(grouped, 25, seed=0)


# ------------------------------------------------------------------ the folds dataset


def _labels(tmp_path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    p = tmp_path / "labels.csv"
    p.write_text("path,label,split,who\n" + "".join(",".join(r) + "\n" for r in rows))
    return p


def test_the_folds_dataset_pools_train_and_val_and_leaves_test_alone(tmp_path):
    rows = [(f"{sp}{i}.png", "ab"[i % 2], sp, f"s{i // 2}") for sp, n in (("train", 16), ("val", 8)) for i in range(n)]
    rows += [(f"test{i}.png", "ab"[i % 2], "test", "t") for i in range(4)]
    labels = _labels(tmp_path, rows)
    reg = get_registry()
    table = {"plugin": "folds", "source": {"plugin": "csv", "root": str(tmp_path), "labels": str(labels),
                                           "group_column": "who"}, "k": 4, "fold": 0}
    source = reg.build("dataset", {**table, "source": {**table["source"], "group_column": ""}}, "data")
    seen: list[Path] = []
    for f in range(4):
        d = reg.build("dataset", {**table, "fold": f}, "data")
        assert set(d.splits) == {"train", "val", "test"} and len(d.splits["train"]) + len(d.splits["val"]) == 24
        assert {s.group for s in d.splits["train"]}.isdisjoint({s.group for s in d.splits["val"]})
        assert [s.path for s in d.splits["test"]] == [s.path for s in source.splits["test"]]
        assert any("pooled train (16) + val (8) = 24 images" in n and "untouched: test (4)" in n for n in d.notes)
        seen += [s.path for s in d.splits["val"]]
    assert sorted(seen) == sorted(s.path for sp in ("train", "val") for s in source.splits[sp])  # each once
    with pytest.raises(FerError, match=r"data.fold: 4 is not below data.k = 4"):
        reg.build("dataset", {**table, "fold": 4}, "data")
    with pytest.raises(FerError, match="data.k"):
        reg.validate("dataset", {**table, "k": 1}, "data")
    # predefined: the folds are the group values, numbers in numeric order
    pre = {**table, "mode": "predefined", "k": 8}
    d = reg.build("dataset", {**pre, "fold": 1}, "data")
    assert {s.group for s in d.splits["val"]} == {"s1"}
    d = reg.build("dataset", {**pre, "fold": 7}, "data")
    assert {s.group for s in d.splits["val"]} == {"s7"}
    with pytest.raises(FerError, match=r"data.k: 3, but the pool has 8 predefined folds \(s0, s1, s2"):
        reg.build("dataset", {**pre, "k": 3}, "data")
    with pytest.raises(FerError, match="'predefined' folds need a group"):
        reg.build("dataset", {**pre, "source": {**table["source"], "group_column": ""}}, "data")


# ------------------------------------------------------------------ fer cv / fer repeat on CK+

CK_RECIPE = """
name = "ck"
[data]
plugin = "csv"
root = "{root}"
labels = "{labels}"
max_train_per_class = 4
[model.backbone]
plugin = "timm"
name = "resnet10t"
in_chans = 1
input_size = 48
[model.heads.emotion]
plugin = "linear"
{au}
[train]
epochs = 1
batch_size = 16
seed = 0
device = "cpu"
precision = "fp32"
num_workers = 0
[tracking]
enabled = false
"""
AU = '[model.heads.au]\nplugin = "linear"\n[loss]\nplugin = "multitask"\n'


def ck_recipe(tmp_path: Path, labels: Path = CKPLUS / "labels.csv", au: bool = False) -> Path:
    p = tmp_path / "ck.toml"
    p.write_text(CK_RECIPE.format(root=CKPLUS, labels=labels, au=AU if au else ""))
    return p


TINY = ["model.backbone.input_size=32", "tracking.enabled=false"]


def cli(*args: str):
    from fer_core.cli import add_plugin_commands, app

    add_plugin_commands()
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@needs_ckplus
def test_fer_cv_by_subject_on_ckplus(tmp_path):
    recipe, out = ck_recipe(tmp_path, au=True), tmp_path / "cv"
    args = ["cv", str(recipe), "--folds", "3", "--group-by", "subject", "--out", str(out),
            *(a for o in TINY for a in ("-o", o))]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "untouched: test (165)" in r.output and "fold-2: trained" in r.output
    report = json.loads((out / "cv.json").read_text())
    pool = sum(1 for row in ck_rows() if row["split"] == "train")
    assert report["pool"] == {"splits": {"train": pool}, "size": pool} and report["untouched"] == {"test": 165}
    assert [run["dir"] for run in report["runs"]] == ["fold-0", "fold-1", "fold-2"]
    # every pooled image validated (and predicted) exactly once, no subject in two folds' val sets
    assert report["oof"]["num_samples"] == report["oof"]["num_images"] == pool
    assert sum(run["num_val"] for run in report["runs"]) == pool
    subjects = [set(run["val_groups"]) for run in report["runs"]]
    assert sum(map(len, subjects)) == len(set().union(*subjects)) == 96
    m = report["runs"][0]["metrics"]
    assert {"accuracy", "macro_f1", "balanced_accuracy", "au_mean_f1", "calibration.ece"} <= set(m)
    assert report["mean"]["accuracy"] == pytest.approx(sum(r["metrics"]["accuracy"] for r in report["runs"]) / 3)
    assert report["std"]["accuracy"] >= 0 and "au_mean_f1" in report["oof"]
    assert len(report["oof"]["confusion_matrix"]) == 7 and (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    fold_recipe = tomllib.loads((out / "fold-1" / "recipe.toml").read_text())
    assert fold_recipe["data"]["plugin"] == "folds" and fold_recipe["data"]["fold"] == 1
    assert fold_recipe["data"]["max_train_per_class"] == 4 and "max_train_per_class" not in fold_recipe["data"]["source"]
    assert fold_recipe["data"]["source"]["group_column"] == "subject"
    # rerun: finished folds are skipped; a fold with a checkpoint but no metrics is resumed: same result
    (out / "fold-1" / "metrics.json").unlink()
    r2 = cli(*args)
    assert r2.exit_code == 0
    assert "fold-0: finished earlier" in r2.output and "fold-1: resumed" in r2.output
    again = json.loads((out / "cv.json").read_text())
    assert again["runs"] == report["runs"] and again["oof"] == report["oof"]
    with pytest.raises(FerError, match="holds a cross-validation of another recipe"):
        cross_validate(recipe, 4, group_by="subject", out=out, overrides=TINY)


@needs_ckplus
def test_cv_refuses_what_it_cannot_do(tmp_path):
    recipe = ck_recipe(tmp_path)
    with pytest.raises(FerError, match="--folds K"):
        cross_validate(recipe, None, out=tmp_path / "x", overrides=TINY)
    with pytest.raises(FerError, match="give one"):
        cross_validate(recipe, 3, group_by="subject", folds_from="fold", overrides=TINY)
    folder = tmp_path / "f.toml"
    folder.write_text(recipe.read_text().replace('plugin = "csv"', 'plugin = "folder"').replace(
        f'labels = "{CKPLUS / "labels.csv"}"\n', ""))
    with pytest.raises(FerError, match="the 'folder' dataset has no group_column parameter.*group_pattern"):
        cross_validate(folder, 3, group_by="subject", overrides=TINY)


@needs_ckplus
def test_fer_cv_folds_from_ckplus_predefined_folds(tmp_path):
    rows = [r for r in ck_rows() if r["fold"] in ("0", "2", "5") or r["split"] == "test"]
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "cv"
    report = cross_validate(ck_recipe(tmp_path, labels), None, folds_from="fold", out=out, overrides=TINY)
    assert report["k"] == 3 and report["mode"] == "predefined" and report["group_column"] == "fold"
    for run, value in zip(report["runs"], ("0", "2", "5")):
        assert run["val_groups"] == [value]
        assert run["num_val"] == sum(1 for r in rows if r["fold"] == value and r["split"] == "train")
    assert report["oof"]["num_samples"] == report["pool"]["size"] == sum(1 for r in rows if r["split"] == "train")


@needs_ckplus
def test_fer_repeat_seeds(tmp_path):
    out = tmp_path / "rep"
    r = cli("repeat", str(ck_recipe(tmp_path)), "--seeds", "0,1", "--out", str(out), *(a for o in TINY for a in ("-o", o)))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "repeat.json").read_text())
    assert report["seeds"] == [0, 1] and [x["dir"] for x in report["runs"]] == ["seed-0", "seed-1"]
    assert all((out / d / "metrics.json").is_file() for d in ("seed-0", "seed-1"))
    accs = [x["metrics"]["accuracy"] for x in report["runs"]]
    assert report["mean"]["accuracy"] == pytest.approx(sum(accs) / 2)
    assert report["std"]["accuracy"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert "mean of 2" in r.output and "std (ddof=1)" in r.output
    again = repeat_seeds(ck_recipe(tmp_path), [0, 1], out=out, overrides=TINY)  # nothing retrained
    assert again["runs"] == report["runs"]


def test_summary_helpers():
    mean, std = mean_std([{"a": 1.0, "b": 2.0}, {"a": 3.0}])
    assert mean == {"a": 2.0} and std["a"] == pytest.approx(2 ** 0.5)
    assert mean_std([{"a": 1.0}])[1] == {"a": None}
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("0,x", "", "1,1"):
        with pytest.raises(FerError, match="--seeds"):
            parse_seeds(bad)


def test_a_repeat_directory_continues_under_a_new_description_but_not_under_a_new_setting(tmp_path):
    from fer_plugins.crossval import _same_plan

    path = tmp_path / "repeat_recipe.toml"
    plan = {"name": "r", "description": "first label", "train": {"epochs": 3}}
    _same_plan(path, plan, "seed repeat")
    saved = path.read_text()
    _same_plan(path, {**plan, "description": "a better label"}, "seed repeat")
    assert path.read_text() == saved
    with pytest.raises(FerError, match="holds a seed repeat of another recipe"):
        _same_plan(path, {**plan, "train": {"epochs": 4}}, "seed repeat")
    assert path.read_text() == saved
