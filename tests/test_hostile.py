"""Hostile inputs, seen from the terminal: every case exits 2 with ONE `error:` line naming the
culprit (file, key or URI), no traceback, and leaves the files already in the run directory
byte-identical — or is handled as documented (exit 0, names printed literally).

Every case runs the real `fer` command in a subprocess. Trained runs are shared per module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import FER2013, tiny_recipe
from hostile_helpers import (assert_untouched, error_line, fer, fer_popen, free_port, mount_tmpfs, snapshot,
                             umount)

pytestmark = pytest.mark.skipif(not (FER2013 / "labels.csv").is_file(), reason="../shared/data/fer2013 not present")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory, fer_subset) -> Path:
    """A valid tiny recipe (1 epoch, no tracking)."""
    p = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    p.write_text(tiny_recipe(fer_subset, None, epochs=1))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base) -> Path:
    """A finished run, shared by the cases that break a copy of it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    r = fer("run", base, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def sentinel_out(tmp_path) -> Path:
    """An existing --out directory with a file of the user's in it: a failed run leaves it alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return out


def copy_run(src: Path, dst: Path) -> Path:
    """A finished run without its (large, here unused) last.pt."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("last.pt", ".lock"))
    return dst


def run_fails(recipe: Path, out: Path, *needles: str, overrides: tuple[str, ...] = (), alone: bool = True) -> str:
    """`fer run` must fail with one line and leave ``out`` as it was (at most its lock file)."""
    before = snapshot(out)
    args = [a for o in overrides for a in ("-o", o)]
    line = error_line(fer("run", recipe, "--out", out, *args), *needles, alone=alone)
    assert_untouched(before, out)
    return line


# ---------------------------------------------------------------------------------------------- recipe files
def test_a_recipe_that_is_not_utf8(tmp_path, sentinel_out):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "café"\n'.encode("latin-1"))
    run_fails(bad, sentinel_out, str(bad), "UTF-8")


def test_an_absurdly_nested_recipe(tmp_path, sentinel_out):
    bad = tmp_path / "deep.toml"
    n = 5_000  # 10,000 levels: inline tables holding arrays holding inline tables ...
    bad.write_text("x = " + "{a = [" * n + "1" + "]}" * n + "\n")
    run_fails(bad, sentinel_out, str(bad), "nested too deeply")


def test_a_recipe_that_is_a_directory(tmp_path, sentinel_out):
    d = tmp_path / "recipe.toml"
    d.mkdir()
    run_fails(d, sentinel_out, str(d), "directory")


def test_a_missing_recipe(tmp_path, sentinel_out):
    run_fails(tmp_path / "nope.toml", sentinel_out, str(tmp_path / "nope.toml"), "not found")


# ---------------------------------------------------------------------------------------------- --out
def test_out_that_is_a_file(tmp_path, base):
    f = tmp_path / "out.txt"
    f.write_text("mine\n")
    error_line(fer("run", base, "--out", f), f"--out {f}", "not a directory")
    assert f.read_text() == "mine\n"


@pytest.fixture
def read_only(tmp_path):
    """(a directory on a tmpfs mounted ``ro``, None) — or (None, why not). Tests run as root, and
    chmod 0o555 does not stop root; a read-only file system (EROFS) does."""
    ro = tmp_path / "ro"
    why_not = mount_tmpfs(ro, "ro,size=1m")
    yield (None, why_not) if why_not else (ro, None)
    if why_not is None:
        umount(ro)


def test_out_on_a_read_only_file_system(base, read_only):
    """Where mounting is not permitted, /sys stands in: sysfs refuses mkdir even to root (EPERM)."""
    ro, _ = read_only
    out, expect = (ro / "run", "read-only") if ro else (Path("/sys/fer-out"), "not permitted")
    error_line(fer("run", base, "--out", out), str(out), expect)
    assert not out.exists()


def test_out_whose_parent_is_a_file(tmp_path, base):
    f = tmp_path / "file"
    f.write_text("mine\n")
    error_line(fer("run", base, "--out", f / "run"), str(f), "not a directory")
    assert f.read_text() == "mine\n"


def test_disk_full_keeps_the_last_good_checkpoint(tmp_path, base, trained):
    """A tmpfs big enough for epoch 1's best.pt and last.pt but not for epoch 2's new last.pt
    beside them (checkpoints are written to a temporary file, then renamed)."""
    best, last = (trained / "best.pt").stat().st_size, (trained / "last.pt").stat().st_size
    disk = tmp_path / "disk"
    why_not = mount_tmpfs(disk, f"size={(best + last + last // 2) // 1024}k")
    if why_not:
        pytest.skip(why_not)
    try:
        out = disk / "run"
        line = error_line(fer("run", base, "--out", out, "-o", "train.epochs=2"), "disk is full", str(out),
                          alone=False)
        assert "(unknown file)" not in line
        import torch

        ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        assert ckpt["train_state"]["epoch"] == 1
        torch.load(out / "best.pt", map_location="cpu", weights_only=True)
        assert not list(out.glob(".*.tmp")), "a half-written checkpoint was left behind"
        assert json.loads((out / "run.json").read_text())["status"] == "failed"
    finally:
        umount(disk)


# ---------------------------------------------------------------------------------------------- run dirs
def test_resume_of_a_directory_that_is_not_a_run(sentinel_out):
    before = snapshot(sentinel_out)
    error_line(fer("run", "--resume", sentinel_out), str(sentinel_out), "not a fer run directory")
    assert_untouched(before, sentinel_out, may_appear=set())


def test_eval_of_a_directory_that_is_not_a_run(sentinel_out):
    before = snapshot(sentinel_out)
    error_line(fer("eval", sentinel_out), str(sentinel_out), "not a fer run directory")
    assert_untouched(before, sentinel_out, may_appear=set())


def test_resume_of_a_run_whose_last_checkpoint_is_not_its_own(tmp_path, trained):
    """A readable torch file that is not this run's state: refused before recipe.toml, resume.log
    or run.json change (the resume also asks for a change that would be logged)."""
    import torch

    run = copy_run(trained, tmp_path / "run")
    torch.save({"format_version": 1, "model": {}}, run / "last.pt")
    before = snapshot(run)
    error_line(fer("run", "--resume", run, "-o", "name=renamed"), str(run / "last.pt"), "not a checkpoint of this run")
    assert_untouched(before, run)


def test_eval_of_a_run_whose_best_checkpoint_is_garbage(tmp_path, trained):
    run = copy_run(trained, tmp_path / "run")
    (run / "best.pt").write_bytes(os.urandom(4096))
    before = snapshot(run)
    error_line(fer("eval", run), str(run / "best.pt"))
    assert_untouched(before, run, may_appear=set())


@pytest.mark.parametrize("garbage", [b"\x00\xff{not json", b"[1, 2, 3]\n"], ids=["bytes", "a list"])
def test_report_of_a_run_whose_metrics_are_garbage(tmp_path, trained, garbage):
    run = copy_run(trained, tmp_path / "run")
    (run / "metrics.json").write_bytes(garbage)
    before = snapshot(run)
    error_line(fer("report", run, "--no-gradcam"), str(run / "metrics.json"))
    assert_untouched(before, run, may_appear=set())


@pytest.mark.parametrize("garbage", [b"{\"members\": [", b"[]"], ids=["truncated", "not an ensemble"])
def test_eval_of_an_ensemble_whose_file_is_corrupt(tmp_path, garbage):
    d = tmp_path / "ens"
    d.mkdir()
    (d / "ensemble.json").write_bytes(garbage)
    before = snapshot(d)
    error_line(fer("eval", d), str(d / "ensemble.json"))
    assert_untouched(before, d, may_appear=set())


# ---------------------------------------------------------------------------------------------- MLflow
def _tracking(uri: str) -> tuple[str, ...]:
    return ("tracking.enabled=true", 'tracking.plugin="mlflow"', f'tracking.uri="{uri}"')


def test_a_corrupt_mlflow_store(tmp_path, base, sentinel_out):
    db = tmp_path / "garbage.db"
    db.write_bytes(b"this is not a sqlite database\x00\xff" * 100)
    before_db = db.read_bytes()
    run_fails(base, sentinel_out, f"sqlite:///{db}", "not an SQLite database", "-o tracking.enabled=false",
              overrides=_tracking(f"sqlite:///{db}"))
    assert db.read_bytes() == before_db


def test_an_mlflow_store_in_a_missing_directory(tmp_path, base, sentinel_out):
    uri = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'mlflow.db'}"
    run_fails(base, sentinel_out, uri, "does not exist", "-o tracking.enabled=false", overrides=_tracking(uri))
    assert not (tmp_path / "no").exists()


def test_an_unwritable_mlflow_store(base, sentinel_out, read_only):
    ro, why_not = read_only
    if why_not:
        pytest.skip(f"no read-only place for the store (root writes anywhere else): {why_not}")
    uri = f"sqlite:///{ro / 'mlflow.db'}"
    run_fails(base, sentinel_out, uri, "not writable", "-o tracking.enabled=false", overrides=_tracking(uri))


def test_an_unreachable_mlflow_server_fails_fast(base, sentinel_out):
    uri = f"http://127.0.0.1:{free_port()}"
    before = snapshot(sentinel_out)
    r = fer("run", base, "--out", sentinel_out, *[a for o in _tracking(uri) for a in ("-o", o)])
    error_line(r, uri, "not reachable", "-o tracking.enabled=false")
    assert r.wall < 30, f"took {r.wall:.0f}s to notice that nothing listens at {uri}"
    assert_untouched(before, sentinel_out)


def test_two_runs_creating_one_new_mlflow_store_at_once(tmp_path, base):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [fer_popen("run", base, "--out", tmp_path / f"run{i}", *[a for o in _tracking(uri) for a in ("-o", o)],
                       "-o", 'tracking.experiment="concurrent"', "-o", "tracking.log_model=false") for i in (1, 2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    for p, _, err in results:
        assert p.returncode == 0, err
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


# ---------------------------------------------------------------------------------------------- names
@pytest.fixture(scope="module")
def bracket_faces(tmp_path_factory, fer_subset) -> Path:
    """A `folder` dataset whose class folders are '[happy]' and 'sad': symlinks to real faces."""
    import csv

    root = tmp_path_factory.mktemp("faces") / "root"
    rows = list(csv.DictReader(fer_subset.open()))
    for folder, label in (("[happy]", "happy"), ("sad", "sad")):
        (root / folder).mkdir(parents=True)
        for r in [r for r in rows if r["label"] == label][:12]:
            (root / folder / Path(r["path"]).name).symlink_to(FER2013 / r["path"])
    return root


def test_markup_in_recipe_run_and_class_names_is_printed_literally(tmp_path, base, bracket_faces):
    name = "[bold]x[/bold] [red]"
    text = base.read_text().split("[model.backbone]", 1)[1]
    recipe = tmp_path / "brackets.toml"
    recipe.write_text(f'name = "{name}"\n[data]\nplugin = "folder"\nroot = "{bracket_faces}"\nval_fraction = 0.25\n'
                      f"[model.backbone]{text}")
    out = tmp_path / "[red]run[/red]"
    r = fer("run", recipe, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"{name}: " in r.stderr  # the start line
    assert "[happy]" in r.stdout and f"run directory: {out}" in r.stdout
    assert json.loads((out / "metrics.json").read_text())["classes"] == ["[happy]", "sad"]
    r = fer("data", recipe)
    assert r.returncode == 0, r.stderr
    assert "[happy]" in r.stdout and str(bracket_faces) in r.stdout
    r = fer("eval", out)
    assert r.returncode == 0, r.stderr
    assert "[happy]" in r.stdout and "[red]run[/red]" in r.stdout


# ---------------------------------------------------------------------------------------------- recipe values
def test_a_misspelt_monitor_fails_before_any_epoch(base, sentinel_out):
    line = run_fails(base, sentinel_out, "train.monitor", "acuracy", "accuracy", "macro_f1",
                     overrides=("train.monitor=acuracy",))
    assert "available" in line
    assert not (sentinel_out / "last.pt").exists()


def test_disabling_an_essential_plugin(base, sentinel_out):
    run_fails(base, sentinel_out, "plugins.disable", "heads", "essential", overrides=('plugins.disable=["heads"]',))


def test_disabling_a_plugin_that_does_not_exist(base, sentinel_out):
    run_fails(base, sentinel_out, "plugins.disable", "nonexistent_plugin",
              overrides=('plugins.disable=["nonexistent_plugin"]',))


@pytest.mark.parametrize("override", [
    "optimizer.lr=-0.1", "optimizer.lr=nan", "schedule.min_lr=-1e-5", "model.heads.emotion.dropout=1.5",
    "augment.hflip=2", "train.batch_size=-1", "train.num_workers=-1", "train.epochs=true",
])
def test_an_out_of_range_value(base, sentinel_out, override):
    key = override.split("=")[0]
    run_fails(base, sentinel_out, key, overrides=(override,))


def test_nan_loss_in_the_first_epoch(tmp_path, base):
    out = tmp_path / "nan"
    line = error_line(fer("run", base, "--out", out, "-o", "optimizer.lr=1e30"), "loss became", alone=False)
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
    assert "last.pt" not in line, "the message points at a checkpoint that does not exist"
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_fer_data_needs_only_a_data_table(tmp_path, fer_subset):
    recipe = tmp_path / "data.toml"
    recipe.write_text(f'[data]\nplugin = "csv"\nroot = "{FER2013}"\nlabels = "{fer_subset}"\n')
    r = fer("data", recipe)
    assert r.returncode == 0, r.stderr
    assert "all label lines valid" in r.stdout
