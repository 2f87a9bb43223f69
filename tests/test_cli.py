"""End-to-end: the `fer` command on real FER2013 faces, a real MLflow store, a RAF-CE tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FER2013, REPO

try:
    from builders import make_rafce_tree
except ImportError:  # pragma: no cover
    from tests.builders import make_rafce_tree

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def fer(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fer_core.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env or ENV, timeout=600)


def test_run_eval_and_mlflow_on_real_faces(write_recipe, tmp_path, mlflow_uri):
    recipe = write_recipe(tracking=True, epochs=2)
    out = tmp_path / "run"
    r = fer("run", str(recipe), "--out", str(out), "-o", "name=e2e")
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "macro-F1" in r.stdout and "per class" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"accuracy", "macro_f1", "balanced_accuracy", "per_class", "confusion_matrix", "classes"}
    assert m["classes"] == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert sum(v["support"] for v in m["per_class"].values()) == 35 == sum(map(sum, m["confusion_matrix"]))
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    saved = (out / "recipe.toml").read_text()
    assert 'name = "e2e"' in saved and "label_column" in saved  # resolved: overrides and plugin defaults

    # the MLflow run: finished, with per-epoch metrics, the recipe, the confusion matrix and the model
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`fer.run_dir` = '%s'" % out.resolve())
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert [h.step for h in client.get_metric_history(run_id, "val_accuracy")] == [1, 2]
    assert runs[0].data.params["model.backbone.name"] == "resnet10t"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"recipe.toml", "metrics.json", "confusion_matrix.png", "model"} <= artifacts

    # eval: same split → same metrics; --json writes the same schema
    js = tmp_path / "eval.json"
    r = fer("eval", str(out), "--json", str(js))
    assert r.returncode == 0, r.stderr
    ev = json.loads(js.read_text())
    assert ev["accuracy"] == pytest.approx(m["accuracy"]) and ev["confusion_matrix"] == m["confusion_matrix"]
    r = fer("eval", str(out), "--split", "nope")
    assert r.returncode == 2 and "split 'nope' not found" in r.stderr

    # another dataset with its own class order: labels are matched to the model's classes by name
    labels = (out / "recipe.toml").read_text().split('labels = "')[1].split('"')[0]
    rows = [line.split(",") for line in Path(labels).read_text().splitlines()[1:]]
    other = tmp_path / "other.csv"
    picked = [r for r in rows if r[3] == "val" and r[1] in ("happy", "angry")]
    other.write_text("path,label,label_id,split\n" + "".join(
        f"{p},{name.upper()},{0 if name == 'happy' else 1},val\n" for p, name, _, _ in picked))
    js2 = tmp_path / "other.json"
    r = fer("eval", str(out), "-o", f"data.labels={other}", "--json", str(js2))
    assert r.returncode == 0, r.stderr
    ev2 = json.loads(js2.read_text())
    assert ev2["classes"] == m["classes"]
    for name in ("happy", "angry"):
        assert ev2["per_class"][name]["support"] == 5
        assert ev2["per_class"][name]["recall"] == pytest.approx(m["per_class"][name]["recall"])
    assert ev2["per_class"]["sad"]["support"] == 0


def test_a_crashed_run_is_marked_failed_in_mlflow(write_recipe, tmp_path, mlflow_uri):
    recipe = write_recipe(tracking=True, epochs=1)
    bad = tmp_path / "bad.toml"
    bad.write_text(recipe.read_text().replace('lr = 0.003', 'lr = 1e30'))  # diverges → NaN guard
    out = tmp_path / "nan"
    r = fer("run", str(bad), "--out", str(out))
    assert r.returncode == 2 and "loss became" in r.stderr and "Traceback" not in r.stderr
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`fer.run_dir` = '%s'" % out.resolve())
    assert [x.info.status for x in runs] == ["FAILED"]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_bad_inputs_exit_2_with_one_line(tmp_path, write_recipe):
    recipe = write_recipe()
    typo = tmp_path / "typo.toml"
    typo.write_text(recipe.read_text().replace("batch_size", "batch_sise"))
    r = fer("recipe", "check", str(typo))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {typo}: train.batch_sise: unknown key (did you mean 'batch_size'?)"]
    r = fer("run", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "recipe file not found" in r.stderr
    r = fer("run", str(recipe), "-o", "model.backbone.plugin=timmm")
    assert r.returncode == 2 and "unknown backbone plugin 'timmm' (did you mean 'timm'?)" in r.stderr
    # a malformed label line names file and line
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\nimages/a.jpg,happy,train\nimages/b.jpg\n")
    r = fer("data", str(recipe), "-o", f"data.labels={labels}", "-o", "data.label_id_column=")
    assert r.returncode == 2 and "labels.csv" in r.stderr and ":3" in r.stderr and "Traceback" not in r.stderr
    r = fer("--debug", "recipe", "check", str(typo))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_images_are_listed_or_skipped(tmp_path, fer_subset):
    labels = tmp_path / "labels.csv"
    rows = fer_subset.read_text().splitlines()
    labels.write_text("\n".join(rows + ["images/nope1.jpg,angry,0,train", "images/nope2.jpg,happy,3,val"]) + "\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nplugin = "csv"\nroot = "{FER2013}"\nlabels = "{labels}"\n'
                      '[model.backbone]\nplugin = "timm"\nname = "resnet10t"\n')
    r = fer("data", str(recipe))
    assert r.returncode == 2
    assert "2 image(s) missing or unreadable" in r.stderr and "nope1.jpg" in r.stderr and "nope2.jpg" in r.stderr
    r = fer("data", str(recipe), "-o", "data.skip_missing=true")
    assert r.returncode == 0 and "skipped 2 missing/unreadable image(s)" in r.stdout
    assert "angry" in r.stdout and "train (used)" in r.stdout


def test_plugins_json_lists_builtins():
    r = fer("plugins", "--json")
    rows = json.loads(r.stdout)
    assert {"kind": "dataset", "name": "rafce", "plugin": "data_rafce", "distribution": "fer-toolkit",
            "version": rows[0]["version"]} in rows


def test_help_is_there_for_every_command():
    for cmd in (["--help"], ["run", "--help"], ["eval", "--help"], ["data", "--help"], ["recipe", "check", "--help"],
                ["plugins", "--help"]):
        r = fer(*cmd)
        assert r.returncode == 0 and "Usage" in r.stdout, cmd


def test_multitask_ready_rafce_recipe_runs_on_a_miniature_official_tree(tmp_path):
    root = make_rafce_tree(tmp_path / "RAF-CE", n_per_class=2, size=64)
    out = tmp_path / "run"
    r = fer("run", str(REPO / "recipes" / "rafce_resnet50_baseline.toml"), "--out", str(out),
            "-o", f"data.root={root}", "-o", "model.backbone.pretrained=false", "-o", "model.backbone.name=resnet10t",
            "-o", "model.backbone.input_size=32", "-o", "train.epochs=1", "-o", "train.batch_size=8",
            "-o", "tracking.enabled=false", "-o", "model.heads.au.plugin=linear")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["classes"]) == 14 and "au_mean_f1" in m
    r = fer("eval", str(out), "--split", "test")
    assert r.returncode == 0, r.stderr
