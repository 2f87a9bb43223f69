"""Grad-CAM (fer_core.explain) and the HTML run report (fer_core.report), on one real tiny run."""

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
from fer_core.errors import FerError
from fer_core.explain import (class_grid, explain_images, grad_cam, overlay, target_layer, target_layer_name,
                              tokens_to_map)
from fer_core.interfaces import Backbone, Preprocessing
from fer_core.model import FerModel
from fer_core.registry import get_registry

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


# ------------------------------------------------------------------ Grad-CAM itself


def test_grad_cam_cnn_shapes_range_and_state_restored():
    torch.manual_seed(0)
    model = tiny_cnn_model()
    model.train()
    model.backbone.model.conv1[0].weight.requires_grad_(False)  # a frozen layer must stay frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    layer = target_layer(model)
    shapes = []
    h = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        model.eval()(torch.zeros(2, 1, 32, 32))
    h.remove()
    assert len(shapes[-1]) == 4 and shapes[-1][0] == 2  # a B×C×H×W map
    # resnet10t at 32×32: layer4 is 1×1, so the last map with spatial extent (layer3, 2×2) is chosen
    assert target_layer_name(model) == "backbone.model.layer3"
    assert target_layer_name(model, "layer4") == "backbone.model.layer4"

    model.train()
    x = torch.randn(5, 1, 32, 32)
    heat = grad_cam(model, x, [0, 1, 2, 3, 4])
    assert heat.shape == (5, 32, 32)
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert model.training  # mode restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    assert grad_cam(model, x, None, layer="layer4").shape == (5, 32, 32)
    with pytest.raises(FerError, match="no module named"):
        grad_cam(model, x, None, layer="nope.layer")


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
    assert target_layer_name(model) == "backbone.model.2"
    x = torch.rand(3, 1, 32, 32) + 0.5
    heat = grad_cam(model, x, [0, 0, 0])
    assert heat.shape == (3, 32, 32)
    # 8×8 map, columns 4.. are zero; bilinear upsampling ×4 keeps output columns ≥ 18 at zero
    assert np.all(heat[:, :, 18:] == 0)
    assert np.all(heat[:, :, :14].max(axis=(1, 2)) > 0.5)
    assert heat[:, :, :16].sum() / heat.sum() > 0.95
    negative = grad_cam(model, x, [1, 1, 1])
    assert np.isfinite(negative).all() and np.all(negative == 0)  # an all-zero map stays zero, no NaN


def test_grad_cam_vit_token_reshape():
    import timm

    torch.manual_seed(0)
    b = get_registry().build("backbone", {"plugin": "timm", "name": "vit_tiny_patch16_224", "input_size": 32,
                                          "in_chans": 1}, "b")
    # the timm plugin does not pass input_size to timm, and a ViT's patch embedding accepts only its
    # img_size: swap in the same architecture made for 32×32 (2×2 patches), plus 2 register tokens
    b.model = timm.create_model("vit_tiny_patch16_224", img_size=32, in_chans=1, num_classes=0, reg_tokens=2)
    model = FerModel(b, {"emotion": nn.Linear(b.feature_dim, 7)}, {"emotion": 7})
    assert target_layer_name(model) == "backbone.model.blocks.11.norm1"
    tokens = []
    h = target_layer(model).register_forward_hook(lambda m, i, o: tokens.append(o.shape))
    x = torch.randn(3, 1, 32, 32)
    heat = grad_cam(model, x, None)
    h.remove()
    assert tokens[-1][1] == 2 * 2 + 3  # class token + 2 register tokens + the 2×2 grid
    assert b.model.num_prefix_tokens == 3
    assert heat.shape == (3, 32, 32) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)

    # the reshape drops N − h·w leading tokens and lays the rest out row by row
    t = torch.full((1, 3 + 6, 2), -1.0)
    t[0, 3:, 0] = torch.arange(6.0)
    m = tokens_to_map(t, (2, 3))
    assert m.shape == (1, 2, 2, 3)
    assert m[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]


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
    paths = explain_images(tiny_run, val_images, out)
    assert [p.name for p in paths] == [f"{p.stem}_gradcam.png" for p in val_images]
    for p in paths:
        w, h = png_size(p)
        assert 200 <= w <= 600 and 200 <= h <= 600
        assert p.stat().st_size > 2000
    (t,) = explain_images(tiny_run, val_images[:1], out / "sad", target="SAD")
    assert t.is_file()
    missing = tmp_path / "no_such_face.jpg"
    with pytest.raises(FerError, match="no_such_face.jpg"):
        explain_images(tiny_run, [val_images[0], missing], out)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(FerError, match="broken.png"):
        explain_images(tiny_run, [bad], out)
    with pytest.raises(FerError, match="not a class"):
        explain_images(tiny_run, val_images, out, target="bored")


def test_class_grid(tiny_run, tmp_path):
    path = class_grid(tiny_run, tmp_path / "grid.png", per_class=2)
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
    from fer_core.inference import evaluate
    from fer_core.report import SECTIONS, write_report

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


def test_report_and_explain_commands(tiny_run, val_images, tmp_path):
    from test_cli import fer

    r = fer("report", str(tiny_run), "--out", str(tmp_path / "rep"), "--no-gradcam")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "report.html").is_file()
    r = fer("explain", str(tiny_run), str(val_images[0]), "--out", str(tmp_path / "ex"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ex" / f"{val_images[0].stem}_gradcam.png").read_bytes()[:4] == b"\x89PNG"
    r = fer("explain", str(tiny_run), str(tmp_path / "missing.jpg"))
    assert r.returncode == 2 and "missing.jpg" in r.stderr
