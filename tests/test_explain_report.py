"""The gradcam explainer and `fer explain` (fer_plugins.explain_gradcam), the HTML run report
(fer_plugins.report_html), and the backbones' declared CAM layers, on one real tiny run."""

from __future__ import annotations

import csv
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FER2013, tiny_recipe
from fer_core.api import Backbone, CamTarget, FerError, Preprocessing, RunPredictor, Sample, figure_png
from fer_core.model import FerModel
from fer_core.registry import get_registry
from fer_plugins.explain_gradcam import (GradCam, build_explainer, explain_images, explainer_spec, grad_cam, overlay,
                                         resolve_target, tokens_to_map)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])  # width, height


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, fer_subset) -> Path:
    """One real run: resnet10t at 32×32, grayscale, 1 epoch on the FER2013 subset."""
    from fer_core.runner import train

    root = tmp_path_factory.mktemp("explain_run")
    recipe = root / "recipe.toml"
    recipe.write_text(tiny_recipe(fer_subset, None, epochs=1))
    out, _ = train(recipe, [], root / "run", None)
    return out


@pytest.fixture(scope="session")
def val_images(fer_subset) -> list[Path]:
    rows = [r for r in csv.DictReader(fer_subset.open()) if r["split"] == "val"]
    return [FER2013 / rows[0]["path"], FER2013 / rows[-1]["path"]]


def tiny_cnn_model() -> FerModel:
    b = get_registry().build("backbone", {"plugin": "timm", "name": "resnet10t", "input_size": 32, "in_chans": 1}, "b")
    return FerModel(b, {"emotion": nn.Linear(b.feature_dim, 7)}, {"emotion": 7})


def assert_maps(heat: np.ndarray, n: int, size: int = 32) -> None:
    assert heat.shape == (n, size, size)
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


# ------------------------------------------------------------------ Grad-CAM itself


def test_grad_cam_cnn_shapes_range_and_state_restored():
    torch.manual_seed(0)
    model = tiny_cnn_model()
    assert model.backbone.cam_target() is None  # a CNN declares nothing: the explainer probes
    model.train()
    model.backbone.model.conv1[0].weight.requires_grad_(False)  # a frozen layer must stay frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    target = resolve_target(model)
    shapes = []
    h = target.module.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        model.eval()(torch.zeros(2, 1, 32, 32))
    h.remove()
    assert len(shapes[-1]) == 4 and shapes[-1][0] == 2  # a B×C×H×W map
    # resnet10t at 32×32: layer4 is 1×1, so the last map with spatial extent (layer3, 2×2) is chosen
    assert (target.name, target.layout) == ("backbone.model.layer3", "NCHW")
    assert resolve_target(model, "layer4").name == "backbone.model.layer4"
    assert resolve_target(model, "backbone.model.layer4").name == "backbone.model.layer4"

    model.train()
    x = torch.randn(5, 1, 32, 32)
    heat = grad_cam(model, x, [0, 1, 2, 3, 4])
    assert_maps(heat, 5)
    assert model.training  # mode restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    assert grad_cam(model, x, None, "layer4").shape == (5, 32, 32)
    with pytest.raises(FerError, match="no module named"):
        grad_cam(model, x, None, "nope.layer")
    with pytest.raises(FerError, match="Grad-CAM needs"):
        resolve_target(model, "heads.emotion")  # B×7 logits

    # the Explainer protocol, built from a recipe table like any component
    explainer = get_registry().build("explainer", {"plugin": "gradcam", "layer": "layer4"}, "explain")
    assert isinstance(explainer, GradCam)
    np.testing.assert_allclose(explainer.explain(model, x, None), grad_cam(model, x, None, "layer4"), atol=1e-6)
    assert explainer.layer_used == "backbone.model.layer4"
    with pytest.raises(FerError, match="explain.window: unknown key"):
        get_registry().validate("explainer", {"plugin": "gradcam", "window": 3}, "explain")


class LeftHalfBackbone(Backbone):
    """conv → ReLU → zero the right half: the last spatial activation is zero on the right."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_dim = 4
        self.preprocessing = Preprocessing((32, 32), 1, (0.5,), (0.5,))
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., :4] = 1

        class Mask(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("mask", mask)

            def forward(self, a):
                return a * self.mask

        self.model = nn.Sequential(nn.Conv2d(1, 4, 4, stride=4), nn.ReLU(), Mask())

    def forward(self, images):
        return self.model(images).mean(dim=(2, 3))


def test_grad_cam_heat_only_where_the_activation_is():
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight[0] = 1.0  # class 0: every channel raises the logit
        head.weight[1] = -1.0  # class 1: every channel lowers it → ReLU leaves nothing
        head.bias.zero_()
    model = FerModel(LeftHalfBackbone(), {"emotion": head}, {"emotion": 2})
    assert resolve_target(model).name == "backbone.model.2"
    x = torch.rand(3, 1, 32, 32) + 0.5
    heat = grad_cam(model, x, [0, 0, 0])
    assert heat.shape == (3, 32, 32)
    # 8×8 map, columns 4.. are zero; bilinear upsampling ×4 keeps output columns ≥ 18 at zero
    assert np.all(heat[:, :, 18:] == 0)
    assert np.all(heat[:, :, :14].max(axis=(1, 2)) > 0.5)
    assert heat[:, :, :16].sum() / heat.sum() > 0.95
    negative = grad_cam(model, x, [1, 1, 1])
    assert np.isfinite(negative).all() and np.all(negative == 0)  # an all-zero map stays zero, no NaN

    # a declared target wins over the probe: here the ReLU, whose map is not masked
    model.backbone.cam_target = lambda: CamTarget(model.backbone.model[1], "model.1")
    assert resolve_target(model).name == "backbone.model.1"
    assert grad_cam(model, x, [0, 0, 0])[:, :, 18:].max() > 0


def test_grad_cam_timm_vit_declares_its_tokens():
    import timm

    torch.manual_seed(0)
    b = get_registry().build("backbone", {"plugin": "timm", "name": "vit_tiny_patch16_224", "input_size": 32,
                                          "in_chans": 1}, "b")
    # the same architecture made for 32×32 (2×2 patches), plus 2 register tokens
    b.model = timm.create_model("vit_tiny_patch16_224", img_size=32, in_chans=1, num_classes=0, reg_tokens=2)
    declared = b.cam_target()
    assert (declared.name, declared.layout, declared.prefix_tokens, declared.grid) == \
        ("model.blocks.11.norm1", "tokens", 3, (2, 2))  # class token + 2 register tokens, then the grid
    model = FerModel(b, {"emotion": nn.Linear(b.feature_dim, 7)}, {"emotion": 7})
    target = resolve_target(model)
    assert target.name == "backbone.model.blocks.11.norm1" and target.module is b.model.blocks[11].norm1
    tokens = []
    h = target.module.register_forward_hook(lambda m, i, o: tokens.append(o.shape))
    x = torch.randn(3, 1, 32, 32)
    heat = grad_cam(model, x, None)
    h.remove()
    assert tokens[-1][1] == 2 * 2 + 3
    assert_maps(heat, 3)
    assert heat.max() == pytest.approx(1.0)
    # --layer on another block reads its tokens the way the backbone declared them
    other = resolve_target(model, "blocks.5")
    assert (other.name, other.layout, other.prefix_tokens, other.grid) == \
        ("backbone.model.blocks.5", "tokens", 3, (2, 2))
    assert_maps(grad_cam(model, x, None, other), 3)

    # the reshape drops N − h·w leading tokens and lays the rest out row by row
    t = torch.full((1, 3 + 6, 2), -1.0)
    t[0, 3:, 0] = torch.arange(6.0)
    m = tokens_to_map(t, (2, 3))
    assert m.shape == (1, 2, 2, 3)
    assert m[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(FerError, match="cannot hold"):
        tokens_to_map(t, (3, 4))


def test_grad_cam_channels_last_and_torchvision_targets():
    import timm
    import torchvision
    from fer_plugins.backbone_timm import TimmBackbone
    from fer_plugins.backbone_torchvision import TorchvisionBackbone

    torch.manual_seed(0)
    gray, rgb = Preprocessing((32, 32), 1, (0.5,), (0.5,)), Preprocessing((32, 32))
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=24, depths=(1, 1),
                             num_heads=(1, 1), in_chans=1, num_classes=0)
    tv_vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                  hidden_dim=8, mlp_dim=16)
    tv_swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                                 window_size=[2, 2])
    tv_vit.heads, tv_swin.head = nn.Identity(), nn.Identity()
    cases = [(TimmBackbone(swin, gray), "backbone.model.layers.1", "NHWC", 0, None),
             (TorchvisionBackbone(tv_vit, 8, rgb), "backbone.model.encoder.layers.encoder_layer_1.ln_1", "tokens", 1,
              (2, 2)),
             (TorchvisionBackbone(tv_swin, 16, rgb), "backbone.model.norm", "NHWC", 0, None)]
    for b, name, layout, prefix, grid in cases:
        model = FerModel(b, {"emotion": nn.Linear(b.feature_dim, 3)}, {"emotion": 3})
        t = resolve_target(model)
        assert (t.name, t.layout, t.prefix_tokens, t.grid) == (name, layout, prefix, grid)
        assert t.module is model.get_submodule(name)
        assert_maps(grad_cam(model, torch.randn(2, b.preprocessing.channels, 32, 32), None), 2)
    # an overridden layer of a channels-last network is read channels-last too
    assert resolve_target(FerModel(cases[0][0], {"emotion": nn.Linear(48, 3)}, {"emotion": 3}),
                          "layers.0").layout == "NHWC"


def test_overlay_rgb_uint8():
    gray = np.full((48, 48, 1), 128, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[:, :16] = 1.0
    out = overlay(gray, heat)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[:, 0], out[:, -1])  # hot left, cold right
    assert overlay(np.zeros((10, 12), np.uint8), np.zeros((10, 12))).shape == (10, 12, 3)


# ------------------------------------------------------------------ on a real run


def test_explain_images_writes_pngs(tiny_run, val_images, tmp_path):
    out = tmp_path / "cams"
    shown = explain_images(tiny_run, val_images, out)
    assert [e.path.name for e in shown] == [f"{p.stem}_gradcam.png" for p in val_images]
    assert [e.image for e in shown] == val_images
    for e in shown:
        w, h = png_size(e.path)
        assert 200 <= w <= 600 and 200 <= h <= 600
        assert e.path.stat().st_size > 2000
    # what it says it predicted is the run's calibrated prediction
    pred = RunPredictor(tiny_run)
    probs = torch.softmax(torch.as_tensor(pred.predict([Sample(p, 0) for p in val_images])["calibrated.emotion"]), 1)
    assert [e.predicted for e in shown] == [pred.classes[int(i)] for i in probs.argmax(1)]
    np.testing.assert_allclose([e.probability for e in shown], probs.max(1).values.numpy(), atol=1e-4)

    (t,) = explain_images(tiny_run, val_images[:1], out / "sad", target="SAD")
    assert t.path.is_file()
    (t,) = explain_images(tiny_run, val_images[:1], out / "l4", layer="layer4")
    assert t.path.is_file()
    assert [e.path.name for e in explain_images(tiny_run, [val_images[0]] * 2, out / "twice")] == \
        [f"{val_images[0].stem}_gradcam.png", f"{val_images[0].stem}-2_gradcam.png"]
    missing = tmp_path / "no_such_face.jpg"
    with pytest.raises(FerError, match="no_such_face.jpg"):
        explain_images(tiny_run, [val_images[0], missing], out)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(FerError, match="broken.png"):
        explain_images(tiny_run, [bad], out)
    with pytest.raises(FerError, match="not a class"):
        explain_images(tiny_run, val_images, out, target="bored")
    with pytest.raises(FerError, match="no module named"):
        explain_images(tiny_run, val_images, out, layer="nope")


def test_explainer_from_the_recipe(tiny_run):
    pred = RunPredictor(tiny_run)
    assert explainer_spec(pred) == {"plugin": "gradcam"}  # no [explain] table: the kind's default
    assert explainer_spec(pred, "layer4") == {"plugin": "gradcam", "layer": "layer4"}
    pred = RunPredictor(tiny_run, ["explain.plugin=gradcam", "explain.layer=layer4"])
    explainer = build_explainer(pred)
    explainer.explain(pred.model, torch.zeros(1, 1, 32, 32), [0])
    assert explainer.layer_used == "backbone.model.layer4"


def test_class_grid(tiny_run, tmp_path):
    from fer_plugins.report_html import class_grid_figure, evaluate_split

    pred = RunPredictor(tiny_run)
    path = tmp_path / "grid.png"
    path.write_bytes(figure_png(class_grid_figure(pred, evaluate_split(pred), build_explainer(pred), per_class=2)))
    w, h = png_size(path)
    assert w > 400 and h > 400


class StrictParser(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.headings: list[str] = []
        self.images: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag not in self.VOID:
            self.stack.append(tag)
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()
        self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())


def test_write_report(tiny_run, tmp_path):
    from fer_core.predictor import evaluate
    from fer_plugins.report_html import SECTIONS, write_report

    path = write_report(tiny_run, tmp_path / "rep")
    assert path == tmp_path / "rep" / "report.html"
    text = path.read_text(encoding="utf-8")
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert parser.headings == list(SECTIONS.values())
    embedded = [s for s in parser.images if s.startswith("data:image/png;base64,")]
    assert len(embedded) >= 6 and len(embedded) == len(parser.images)
    assert 'src="http' not in text and "<script src" not in text and "<link" not in text
    report = evaluate(tiny_run, None, [])
    for c in report["classes"]:
        assert c in text
    cal = report["calibration"]
    assert f"{cal['ece']:.3f}" in text and f"{cal['ece_calibrated']:.3f}" in text
    assert "name = &quot;tiny&quot;" in text  # the recipe, HTML-escaped
    assert "layer <code>backbone.model.layer3</code>" in text  # the Grad-CAM caption names its layer
    # the calibrator was fitted on this very split: the report says so next to the reliability diagram
    assert text.count('class="note in-sample"') == 1 and "(in-sample)" in text
    for name in ("training_curves.png", "confusion_counts.png", "confusion_normalized.png", "per_class.png",
                 "reliability.png", "gradcam_grid.png"):
        png_size(path.parent / name)
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporaries

    # default location, and without Grad-CAM: a grid left by an earlier report there is removed
    (tiny_run / "report").mkdir(exist_ok=True)
    (tiny_run / "report" / "gradcam_grid.png").write_bytes(PNG_SIGNATURE)
    (tiny_run / "report" / "confused_99.png").write_bytes(PNG_SIGNATURE)
    plain = write_report(tiny_run, gradcam=False)
    assert plain == tiny_run / "report" / "report.html"
    assert 'id="gradcam"' not in plain.read_text(encoding="utf-8")
    assert not (plain.parent / "gradcam_grid.png").exists() and not (plain.parent / "confused_99.png").exists()

    # another split than the calibrator's: out of sample, no note
    other = write_report(tiny_run, tmp_path / "train", split="train", gradcam=False).read_text(encoding="utf-8")
    assert "split <b>train</b>" in other and "in-sample" not in other.replace(".in-sample {", "")
    with pytest.raises(FerError, match="split 'nope' not found"):
        write_report(tiny_run, tmp_path / "nope", split="nope")


def test_report_and_explain_commands(tiny_run, val_images, tmp_path):
    from typer.testing import CliRunner

    from fer_core.cli import add_plugin_commands, app
    from test_cli import fer

    add_plugin_commands()  # what `fer` does first: the plugins contribute both commands
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0 and "explain" in r.output and "report" in r.output
    r = fer("report", str(tiny_run), "--out", str(tmp_path / "rep"), "--no-gradcam")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "report.html").is_file() and "report.html" in r.stdout
    r = fer("explain", str(tiny_run), *map(str, val_images), "--out", str(tmp_path / "ex"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ex" / f"{val_images[0].stem}_gradcam.png").read_bytes()[:4] == b"\x89PNG"
    # one line per image: the image, its predicted class and calibrated probability
    classes = RunPredictor(tiny_run).classes
    lines = [ln for ln in r.stdout.splitlines() if " (p=" in ln]
    assert len(lines) == len(val_images)
    for line, image in zip(lines, val_images):
        assert line.startswith(f"{image}: ") and line.split(": ", 1)[1].split(" (p=")[0] in classes
        assert 0 <= float(line.split("(p=")[1].split(")")[0]) <= 1
    r = fer("explain", str(tiny_run), str(tmp_path / "missing.jpg"))
    assert r.returncode == 2 and "missing.jpg" in r.stderr
