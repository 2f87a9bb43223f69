"""A third-party plugin, really pip-installed (into an isolated target dir), is listed and usable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from test_cli import ENV, fer


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("src") / "fer-plugin-example"  # build outside the repo tree
    shutil.copytree(REPO / "examples" / "fer-plugin-example", src)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return target


def test_installed_plugin_is_listed_and_usable(site, write_recipe, tmp_path):
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), ENV.get("PYTHONPATH", "")])}
    rows = json.loads(fer("plugins", "--json", env=env).stdout)
    assert {"kind": "head", "name": "cosine", "plugin": "cosine_head", "distribution": "fer-plugin-example",
            "version": "0.3.0"} in rows
    # without the install it is not there, and a recipe naming it is a clear error
    assert not any(r["kind"] == "head" and r["name"] == "cosine" for r in json.loads(fer("plugins", "--json").stdout))

    recipe = write_recipe(epochs=1)
    recipe.write_text(recipe.read_text().replace('[model.heads.emotion]\nplugin = "linear"',
                                                 '[model.heads.emotion]\nplugin = "cosine"\nscale = 10.0'))
    r = fer("recipe", "check", str(recipe))
    assert r.returncode == 2 and "unknown head plugin 'cosine'" in r.stderr
    r = fer("run", str(recipe), "--out", str(tmp_path / "run"), env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["accuracy"] >= 0
    # and it can be blocked by name
    r = fer("recipe", "check", str(recipe), env={**env, "FER_DISABLE_PLUGINS": "cosine_head"})
    assert r.returncode == 2 and "unknown head plugin 'cosine'" in r.stderr


def test_installed_plugin_adds_a_command_that_runs(site, write_recipe, tmp_path):
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), ENV.get("PYTHONPATH", "")])}
    assert "class-similarity" in fer("--help", env=env).stdout
    assert "class-similarity" not in fer("--help").stdout
    out = tmp_path / "run"
    assert fer("run", str(write_recipe(epochs=1)), "--out", str(out)).returncode == 0
    r = fer("class-similarity", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert "happy" in r.stdout and r.stdout.count("+1.00") == 7  # each of the 7 classes is itself
    r = fer("class-similarity", str(tmp_path / "nope"), env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr
