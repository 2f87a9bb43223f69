"""`fer export` (the built-in `export_onnx` plugin) and ONNX files as Predictors, on a real tiny
run: parity with torch, `fer eval` agreement, metadata round trip, int8, refusals."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_recipe
from fer_core.api import FerError, Preprocessing, load_predictor, resolved, softmax, split_samples
from fer_core.cli import main
from fer_plugins.export_onnx import DEFAULT_TOLERANCE, OnnxExporter, OnnxPredictor


def fer(*args: str) -> tuple[int, str, str]:
    """The `fer` command in this process (the import and plugin loading are paid once)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(list(args))
    return int(e.value.code or 0), out.getvalue(), err.getvalue()


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def meta_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fer_subset):
    from fer_core.runner import train

    d = tmp_path_factory.mktemp("onnx_run")
    recipe = d / "r.toml"
    recipe.write_text(tiny_recipe(fer_subset, None, epochs=1))
    train(recipe, [], d / "run", None)
    return d / "run"


@pytest.fixture(scope="module")
def run(run_dir):
    return load_predictor(run_dir, device="cpu")


@pytest.fixture(scope="module")
def val(run):
    return split_samples(run, None)[1]


@pytest.fixture(scope="module")
def exported(run_dir):
    out = run_dir.parent / "model.onnx"
    code, stdout, err = fer("export", str(run_dir), "--format", "onnx", "--out", str(out))
    assert code == 0, err
    return out, stdout


@pytest.fixture(scope="module")
def onnx_pred(exported):
    pred = load_predictor(exported[0])
    assert isinstance(pred, OnnxPredictor)
    return pred


def test_export_checks_parity_on_validation_faces_and_prints_it(exported, run, val):
    out, printed = exported
    m = re.search(r"parity on (\d+) 'val' images: max \|Δ logits\| torch vs onnxruntime = (\S+) \(tolerance", printed)
    assert m, printed
    assert int(m.group(1)) == len(val) == 35
    delta = float(m.group(2))
    assert 0 <= delta <= DEFAULT_TOLERANCE
    parity = json.loads(meta_of(out)["fer.parity"])
    assert parity["max_abs_diff"] == pytest.approx(delta, rel=0.01, abs=1e-12) and parity["tolerance"] == 1e-3
    assert f"→ {out}" in printed and "outputs emotion" in printed


def test_onnx_predictor_matches_the_run_at_any_batch_size(run, onnx_pred, val):
    ref = run.predict(val)
    for bs in (1, 7, 64):  # dynamic batch: 1, a ragged last batch, all in one
        got = onnx_pred.predict(val, batch_size=bs)
        np.testing.assert_array_equal(got["label"], ref["label"])
        np.testing.assert_allclose(got["logits.emotion"], ref["logits.emotion"], atol=DEFAULT_TOLERANCE)
        np.testing.assert_allclose(softmax(got["calibrated.emotion"]), softmax(ref["calibrated.emotion"]), atol=1e-4)
    # images already normalised for another preprocessing are adapted, as the torch path does
    x = next(iter(run.loader(val[:4])))["image"]
    np.testing.assert_allclose(onnx_pred.logits(x, run.preprocessing).numpy(), run.logits(x, run.preprocessing).numpy(),
                               atol=1e-4)
    np.testing.assert_allclose(onnx_pred.logits(x, run.preprocessing, calibrated=False).numpy(),
                               run.logits(x, run.preprocessing, calibrated=False).numpy(), atol=DEFAULT_TOLERANCE)


def test_fer_eval_of_the_run_and_of_the_onnx_file_agree(run_dir, exported, tmp_path, run, onnx_pred, val):
    out, _ = exported
    a, b = tmp_path / "run.json", tmp_path / "onnx.json"
    code, _, err = fer("eval", str(run_dir), "--json", str(a))
    assert code == 0, err
    root = run.recipe.data.params()["root"]
    code, printed, err = fer("eval", str(out), "--json", str(b), "-o", f"data.root={root}")
    assert code == 0, err
    assert "accuracy" in printed
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert rb["accuracy"] == ra["accuracy"] and rb["macro_f1"] == ra["macro_f1"]
    assert rb["confusion_matrix"] == ra["confusion_matrix"]
    assert rb["calibration"]["ece_calibrated"] == pytest.approx(ra["calibration"]["ece_calibrated"], abs=1e-4)
    assert rb["inference"]["kind"] == "onnx" and "onnxruntime" in rb["inference"]["runtime"]
    # test-time augmentation combines the views the way the torch path does
    from fer_core.predictor import build_tta

    views = build_tta(run)
    np.testing.assert_allclose(softmax(onnx_pred.predict(val, views)["calibrated.emotion"]),
                               softmax(run.predict(val, views)["calibrated.emotion"]), atol=1e-4)


def test_metadata_round_trips(exported, run, onnx_pred):
    out, _ = exported
    meta = meta_of(out)
    assert json.loads(meta["fer.classes"]) == run.classes and json.loads(meta["fer.au_names"]) == []
    stored = json.loads(meta["fer.preprocessing"])
    assert stored == {"input_size": [32, 32], "channels": 1, "mean": [0.449], "std": [0.226]}
    assert Preprocessing.from_dict(stored) == run.preprocessing
    assert json.loads(meta["fer.calibration"]) == run.calibration
    assert float(meta["fer.temperature"]) == run.calibration["state"]["temperature"]
    assert json.loads(meta["fer.quantization"]) == {"method": "none"}
    assert json.loads(meta["fer.source"])["run"] == str(Path(run.path).resolve())
    # what the predictor rebuilds from it
    assert onnx_pred.classes == run.classes and onnx_pred.au_names == run.au_names == []
    assert onnx_pred.preprocessing == run.preprocessing
    assert onnx_pred.calibrator.state() == run.calibrator.state()
    assert resolved(onnx_pred.recipe) == resolved(run.recipe)
    assert onnx_pred.describe()["kind"] == "onnx" and onnx_pred.size_mb() > 1
    # the graph: one input with a dynamic batch, raw emotion logits out
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["emotion"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 32, 32]


def test_int8_is_smaller_and_prints_the_accuracy_change(run_dir, exported, val):
    fp32, _ = exported
    out = run_dir.parent / "model.int8.onnx"
    code, printed, err = fer("export", str(run_dir), "--int8", "--out", str(out))
    assert code == 0, err
    assert out.stat().st_size < 0.4 * fp32.stat().st_size
    m = re.search(r"val accuracy on 35 'val' images: fp32 (\S+) → int8 (\S+) \(change ([-+]\S+)\)", printed)
    assert m, printed
    q = json.loads(meta_of(out)["fer.quantization"])
    assert q["method"] == "static" and q["format"] == "QDQ" and q["calibration_split"] == "train"
    assert q["calibration_images"] == 70
    assert float(m.group(1)) == pytest.approx(q["val_accuracy_fp32"], abs=1e-4)
    assert float(m.group(3)) == pytest.approx(q["val_accuracy_int8"] - q["val_accuracy_fp32"], abs=1e-4)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    pred = load_predictor(out)
    assert pred.describe()["quantization"] == "static"
    acc = float(np.mean(pred.predict(val)["calibrated.emotion"].argmax(1) == np.array([s.label for s in val])))
    assert acc == pytest.approx(q["val_accuracy_int8"])


class _TwoHeads(torch.nn.Module):
    """A small model with an emotion and an AU head (the export path does not care how it was built)."""

    def __init__(self, classes: int, aus: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.emotion, self.au = torch.nn.Linear(8, classes), torch.nn.Linear(8, aus)

    def forward(self, x):
        f = self.features(x)
        return {"au": self.au(f), "emotion": self.emotion(f)}  # order on purpose: the file puts emotion first


def test_a_model_with_an_au_head_exports_both_outputs(run, tmp_path, val):
    model = _TwoHeads(len(run.classes), 3).eval()
    au_run = SimpleNamespace(model=model, path=tmp_path / "au_run", name="au_run", classes=run.classes,
                             au_names=["AU1", "AU6", "AU12"], preprocessing=run.preprocessing, recipe=run.recipe,
                             registry=run.registry, calibration=run.calibration, device=run.device,
                             describe=lambda: {"kind": "run"})
    exporter = OnnxExporter()
    out = exporter.export(au_run, tmp_path / "au.onnx")
    assert exporter.report["outputs"] == ["emotion", "au"]
    assert set(exporter.report["parity"]["per_output"]) == {"emotion", "au"}
    assert exporter.report["parity"]["max_abs_diff"] <= DEFAULT_TOLERANCE
    pred = load_predictor(out)
    assert pred.au_names == ["AU1", "AU6", "AU12"] and pred.outputs == ["emotion", "au"]
    assert json.loads(meta_of(out)["fer.au_names"]) == ["AU1", "AU6", "AU12"]
    got = pred.predict(val[:6])
    with torch.no_grad():
        ref = model(next(iter(pred.loader(val[:6])))["image"])
    assert got["logits.au"].shape == (6, 3) and got["au_mask"].sum() == 0  # FER2013 carries no AU labels
    np.testing.assert_allclose(got["logits.au"], ref["au"].numpy(), atol=DEFAULT_TOLERANCE)
    np.testing.assert_allclose(got["logits.emotion"], ref["emotion"].numpy(), atol=DEFAULT_TOLERANCE)


def test_a_broken_export_is_refused_and_nothing_is_written(run, exported, tmp_path, monkeypatch):
    """What the parity check is for: a graph whose logits differ from torch's (here the exported
    graph with its classifier bias shifted by 0.01) is refused at the default tolerance."""
    proto = onnx.load(str(exported[0]))
    bias = next(t for t in proto.graph.initializer if len(t.dims) == 1 and t.dims[0] == len(run.classes))
    arr = onnx.numpy_helper.to_array(bias) + 0.01
    bias.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), bias.name))
    monkeypatch.setattr(OnnxExporter, "_torch_export", lambda self, model, pre: (proto, ["emotion"]))
    out = tmp_path / "broken.onnx"
    with pytest.raises(FerError, match=r"parity check failed: max \|Δ logits\| torch vs onnxruntime = 0\.01"):
        OnnxExporter().export(run, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_inputs_exit_2_with_one_line(run_dir, exported, tmp_path):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    line = one_error_line(*fer("export", str(not_a_run))[::2])
    assert "not a fer run directory" in line
    line = one_error_line(*fer("export", str(tmp_path / "missing"))[::2])
    assert "no such run directory or file" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = one_error_line(*fer("export", str(run_dir), "--out", str(blocker / "model.onnx"))[::2])
    assert "--out: cannot write" in line and "is a file, not a directory" in line
    line = one_error_line(*fer("export", str(run_dir), "--out", str(tmp_path / "model.pt"))[::2])
    assert "must end in .onnx" in line
    line = one_error_line(*fer("export", str(run_dir), "--format", "tflite")[::2])
    assert "--format: unknown format 'tflite'" in line and "onnx" in line
    line = one_error_line(*fer("export", str(run_dir), "--opset", "9")[::2])
    assert line.startswith("error: --opset: ") and "18" in line
    line = one_error_line(*fer("export", str(exported[0]))[::2])
    assert "only run directories can be exported" in line and "'onnx'" in line
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx")
    line = one_error_line(*fer("eval", str(garbage))[::2])
    assert "not a readable ONNX model" in line
    assert not list(tmp_path.glob("*.onnx.*")) and not (run_dir.parent / "run.onnx").exists()
