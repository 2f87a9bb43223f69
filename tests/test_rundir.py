"""A run directory is owned by one process; a resume is compared with the run before anything
is written; default run names never collide."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from fer_core.errors import FerError
from fer_core.runner import default_out_dir, train
from fer_core.recipe import validate
from test_cli import ENV, fer


def snapshot(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()
            and p.name != ".lock"}


def test_a_running_fer_run_holds_its_directory_against_run_and_resume(write_recipe, tmp_path):
    recipe = write_recipe(epochs=50)
    out = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "fer_core.cli", "run", str(recipe), "--out", str(out)],
                             cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        # the lock is taken at once; recipe.toml follows once the data are checked and the model built
        while time.time() < deadline and not ((out / ".lock").is_file() and (out / "recipe.toml").is_file()):
            time.sleep(0.05)
        assert (out / ".lock").read_text().startswith(f"pid {first.pid} ")
        validate(__import__("tomllib").loads(recipe.read_text()), "warm-up")  # plugin imports are start-up cost
        t0 = time.perf_counter()
        with pytest.raises(FerError, match=rf"{out}: in use by pid {first.pid}"):
            train(recipe, ["name=other"], out, None)
        with pytest.raises(FerError, match=rf"in use by pid {first.pid}"):
            train(None, [], None, out)
        assert time.perf_counter() - t0 < 1.0  # refused at once: nothing read, nothing built
        r = fer("run", str(recipe), "--out", str(out))
        assert r.returncode == 2 and f"in use by pid {first.pid}" in r.stderr and "Traceback" not in r.stderr
        assert first.poll() is None  # the holder trains on, undisturbed
    finally:
        first.kill()
        first.wait()
    assert 'name = "tiny"' in (out / "recipe.toml").read_text()  # the first run's recipe, not the other's


def test_the_lock_refusal_takes_less_than_a_second_in_process(write_recipe, tmp_path):
    from fer_core.rundir import RunDir

    out = tmp_path / "held"
    with RunDir(out).lock():
        t0 = time.perf_counter()
        with pytest.raises(FerError, match=r"in use by pid \d+"):
            train(write_recipe(), [], out, None)
        assert time.perf_counter() - t0 < 1.0


def test_default_run_directories_never_collide(tmp_path, monkeypatch, write_recipe):
    monkeypatch.chdir(tmp_path)
    recipe = validate({"name": "same [name]", "data": {"plugin": "csv", "root": "x"},
                       "model": {"backbone": {"plugin": "timm", "name": "resnet10t"}}, "tracking": {"enabled": False}}, "r")
    dirs = {default_out_dir(recipe) for _ in range(5)}
    assert len(dirs) == 5 and all(d.is_dir() and "[" not in d.name for d in dirs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fer_subset):
    from conftest import tiny_recipe

    root = tmp_path_factory.mktemp("finished")
    recipe = root / "r.toml"
    recipe.write_text(tiny_recipe(fer_subset, None, epochs=2).replace('[schedule]\nplugin = "cosine"\n', ""))
    train(recipe, [], root / "run", None)
    return root / "run"


@pytest.mark.parametrize("override,key", [
    ("model.backbone.name=\"resnet18\"", "model.backbone.name"),
    ("optimizer.lr=0.5", "optimizer.lr"),
    ("train.seed=3", "train.seed"),
    ("schedule={plugin = \"cosine\"}", "schedule"),
])
def test_a_resume_that_cannot_apply_is_refused_before_anything_is_written(finished, override, key):
    before = snapshot(finished)
    with pytest.raises(FerError, match=rf"--resume: these changes cannot apply .*{key}"):
        train(None, [override], None, finished)
    assert snapshot(finished) == before


def test_more_epochs_are_applied_for_real_and_logged(finished, tmp_path):
    import shutil

    run = tmp_path / "more"
    shutil.copytree(finished, run)
    _, final = train(None, ["train.epochs=3"], None, run)
    assert final["epochs_run"] == 3
    assert "train.epochs: 2 -> 3" in (run / "resume.log").read_text()
    assert "epochs = 3" in (run / "recipe.toml").read_text()
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and "error" not in status
    with pytest.raises(FerError, match="fewer epochs than planned"):
        train(None, ["train.epochs=1"], None, run)


def test_more_epochs_under_a_schedule_laid_out_for_fewer_are_refused(write_recipe, tmp_path):
    out = tmp_path / "cos"
    train(write_recipe(epochs=1), [], out, None)
    before = snapshot(out)
    with pytest.raises(FerError, match=r"train.epochs 1 → 2: the schedule 'cosine' .* would not extend correctly"):
        train(None, ["train.epochs=2"], None, out)
    assert snapshot(out) == before


def test_stale_temporary_files_of_killed_writes_are_cleaned(finished, tmp_path):
    import shutil

    run = tmp_path / "tmpclean"
    shutil.copytree(finished, run)
    stale = run / ".last.pt.abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = run / ".best.pt.efgh.tmp"
    fresh.write_bytes(b"being written right now")
    train(None, [], None, run)
    assert not stale.exists() and fresh.exists()
