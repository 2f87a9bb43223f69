"""Image input: full decoding checks, hostile files, 16-bit and EXIF handling, split warnings,
and the eval resize (torch) against cv2. Hostile files are built in tmp_path from real faces."""

from __future__ import annotations

import csv
import functools
import itertools
import os
import re
import struct
import subprocess
import sys
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FER2013, REPO, needs_fer2013
from fer_core import data as fdata
from fer_core.data import ImageDataset, check_images, eval_transform, load_image, make_splits, scan_images
from fer_core.errors import FerError
from fer_core.interfaces import DataSource, Preprocessing, Sample

pytestmark = needs_fer2013

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


@functools.lru_cache(maxsize=1)
def _first_train_faces() -> tuple[Path, ...]:
    with (FER2013 / "labels.csv").open() as f:
        return tuple(FER2013 / r["path"] for r in itertools.islice(
            (r for r in csv.DictReader(f) if r["split"] == "train"), 16))


def faces(n: int = 6) -> list[Path]:
    """The first ``n`` real FER2013 training faces (48×48 grayscale JPEG), read in place."""
    out = list(_first_train_faces()[:n])
    assert len(out) == n
    return out


def face_array(i: int = 0) -> np.ndarray:
    """A real face as H×W uint8 (grayscale)."""
    with Image.open(faces(i + 1)[i]) as im:
        return np.asarray(im.convert("L")).copy()


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: lets a file declare any size or bit depth."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def bomb_png(path: Path, side: int) -> Path:
    """A PNG declaring side×side pixels whose body is a few bytes (PIL reads the header only)."""
    path.write_bytes(png_bytes(side, side, 8, 0, b"\x00" * 64))
    return path


def truncated_jpeg(path: Path, src: Path | None = None) -> Path:
    data = (src or faces(1)[0]).read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, the entropy-coded body cut
    return path


def one_bad(tmp_path: Path, bad: Path) -> tuple[list[Sample], Path]:
    """Three good real faces plus ``bad``."""
    return [Sample(p, 0) for p in faces(3)] + [Sample(bad, 1)], bad


def assert_named(samples: list[Sample], bad: Path, reason: str) -> None:
    """check_images names the file and the reason; skip_missing drops exactly it and counts it."""
    with pytest.raises(FerError, match=r"^1 image\(s\) missing or unreadable: " + re.escape(f"{bad} ({reason}")):
        check_images(samples, skip_missing=False)
    kept, counts = check_images(samples, skip_missing=True)
    assert [s.path for s in kept] == [s.path for s in samples if s.path != bad]
    assert counts == Counter({reason: 1})


# ------------------------------------------------------------------------------ hostile files


def test_truncated_jpeg_is_caught_by_full_decoding(tmp_path):
    bad = truncated_jpeg(tmp_path / "cut.jpg")
    with Image.open(bad) as im:  # the old header-only check let it through
        im.verify()
    samples, _ = one_bad(tmp_path, bad)
    assert_named(samples, bad, "truncated")
    with pytest.raises(OSError, match="truncated"):
        load_image(bad, 1)


def test_zero_byte_file(tmp_path):
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    assert_named(*one_bad(tmp_path, bad), "empty file")


def test_text_file_named_png(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("path,label\nthis is not an image\n")
    assert_named(*one_bad(tmp_path, bad), "not an image")


@pytest.mark.parametrize("side", [100_000, 10_050], ids=["far-above-limit", "just-above-limit"])
def test_decompression_bomb_header(tmp_path, side):
    """100000² is refused by PIL itself; 10050² (101 MP) is where PIL only warns: both are errors."""
    bad = bomb_png(tmp_path / "bomb.png", side)
    assert bad.stat().st_size < 200  # small on disk, huge when decoded
    assert side * side > fdata.MAX_PIXELS and Image.MAX_IMAGE_PIXELS == fdata.MAX_PIXELS
    samples, _ = one_bad(tmp_path, bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes the check
        assert_named(samples, bad, "too large")
    (b,) = scan_images(samples).bad
    assert b.detail == f"{side * side:,} pixels, above the limit of {fdata.MAX_PIXELS:,} (fer_core.data.MAX_PIXELS)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(Image.DecompressionBombError):
            load_image(bad, 1)


def test_directory_missing_and_permission_denied(tmp_path, monkeypatch):
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    assert_named(*one_bad(tmp_path, folder), "a directory, not a file")
    assert_named(*one_bad(tmp_path, tmp_path / "gone.jpg"), "missing")

    locked = tmp_path / "locked.jpg"
    locked.write_bytes(faces(1)[0].read_bytes())
    if os.geteuid() == 0:  # root reads everything: make this one file unreadable for the check
        real = Path.read_bytes

        def read_bytes(self: Path) -> bytes:
            if self == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    else:
        locked.chmod(0)
    assert_named(*one_bad(tmp_path, locked), "permission denied")


def test_every_reason_listed_and_counted_together(tmp_path):
    good = [Sample(p, 0) for p in faces(4)]
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    bad = [truncated_jpeg(tmp_path / "cut1.jpg"), truncated_jpeg(tmp_path / "cut2.jpg", faces(2)[1]),
           tmp_path / "dir.jpg", tmp_path / "empty.png", tmp_path / "text.png",
           bomb_png(tmp_path / "bomb.png", 100_000), tmp_path / "gone.jpg"]
    samples = good[:2] + [Sample(p, 1) for p in bad] + good[2:]
    with pytest.raises(FerError) as e:
        check_images(samples, skip_missing=False)
    msg = str(e.value)
    assert msg.startswith("7 image(s) missing or unreadable [2 truncated, ")
    for p, why in zip(bad, ["truncated", "truncated", "a directory, not a file", "empty file", "not an image",
                            "too large", "missing"]):
        assert f"{p} ({why}" in msg
    assert "\n" not in msg and "data.skip_missing = true" in msg
    kept, counts = check_images(samples, skip_missing=True)
    assert kept == good
    assert counts == {"truncated": 2, "a directory, not a file": 1, "empty file": 1, "not an image": 1,
                      "too large": 1, "missing": 1}
    listed = scan_images(samples).bad  # in sample order, each file once
    assert [b.path for b in listed] == bad and listed[5].detail.startswith("10,000,000,000 pixels")
    assert scan_images(samples + samples).bad == listed

    # make_splits: skipped count, per reason, and one warning line saying so
    src = DataSource(classes=["a", "b"], splits={"train": samples + [Sample(faces(6)[5], 1)],
                                                 "val": [Sample(faces(5)[4], 0), Sample(tmp_path / "gone2.jpg", 1)]})
    sp = make_splits(src, train_split="train", val_split="val", val_fraction=0.2, seed=0, skip_missing=True)
    assert sp.skipped == 8 and sp.skipped_by_reason == {**counts, "missing": 2}
    assert len(sp.train) == 5 and len(sp.val) == 1
    (skip,) = [w for w in sp.warnings if w.startswith("skipped")]
    assert skip == ("skipped 8 image(s) that cannot be used (data.skip_missing = true): 2 truncated, 2 missing, "
                    "1 a directory, not a file, 1 empty file, 1 not an image, 1 too large")


# ------------------------------------------------------------------------- pixel conversions


def test_16bit_grayscale_png_is_scaled_not_saturated(tmp_path):
    g = face_array().astype(np.uint16)
    full = tmp_path / "full.png"
    Image.fromarray(g * 257).save(full)  # the whole 16-bit range
    low = tmp_path / "low.png"
    Image.fromarray(g * 64).save(low)  # a 14-bit sensor range: values up to 16320
    with Image.open(full) as im:
        assert im.mode.startswith("I")  # "I;16" (or "I" in older Pillow)
    assert np.array_equal(load_image(full, 1)[:, :, 0], g.astype(np.uint8))
    got = load_image(low, 1)[:, :, 0].astype(int)
    want = np.round(g.astype(float) * 64 * 255 / 65535).astype(int)
    assert np.abs(got - want).max() <= 1  # proportional to the 16-bit value
    assert got.max() <= 64 and (got == 255).sum() == 0  # not clipped to near-white
    assert np.corrcoef(got.ravel(), g.ravel())[0, 1] > 0.999
    rgb = load_image(full, 3)  # grayscale replicated to RGB
    assert rgb.shape == (48, 48, 3) and all(np.array_equal(rgb[:, :, c], g.astype(np.uint8)) for c in range(3))

    # a 32-bit "I" image (e.g. TIFF) holding 16-bit values
    tif = tmp_path / "i32.tif"
    Image.fromarray((g * 257).astype(np.int32)).save(tif)
    with Image.open(tif) as im:
        assert im.mode == "I"
    assert np.array_equal(load_image(tif, 1)[:, :, 0], g.astype(np.uint8))
    kept, counts = check_images([Sample(full, 0), Sample(low, 0), Sample(tif, 0)], skip_missing=False)
    assert len(kept) == 3 and not counts


def test_16bit_rgb_png(tmp_path):
    g = face_array().astype(np.uint16)
    rgb16 = np.stack([g * 257, (255 - g) * 257, np.full_like(g, 128 * 257)], axis=2)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)  # filter 0 per row
    p = tmp_path / "rgb16.png"
    p.write_bytes(png_bytes(48, 48, 16, 2, raw))
    got = load_image(p, 3)
    assert got.dtype == np.uint8 and got.shape == (48, 48, 3)
    assert np.array_equal(got[:, :, 0], g) and np.array_equal(got[:, :, 1], 255 - g)
    assert (got[:, :, 2] == 128).all()


def test_exif_orientation_is_applied(tmp_path):
    face = Image.fromarray(face_array()[:, 8:40])  # 32 wide × 48 high: orientation shows in the shape
    stored = face.transpose(Image.Transpose.ROTATE_90)  # 48 wide × 32 high on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    p = tmp_path / "rotated.jpg"
    stored.save(p, quality=100, exif=exif)
    with Image.open(p) as im:
        assert im.size == (48, 32) and im.getexif()[0x0112] == 6
    got = load_image(p, 1)[:, :, 0].astype(int)
    assert got.shape == (48, 32)
    want = np.asarray(face).astype(int)
    assert np.abs(got - want).mean() < 2  # JPEG rounding only
    wrong = np.asarray(face.transpose(Image.Transpose.ROTATE_180)).astype(int)  # a wrong turn, same shape
    assert np.abs(got - wrong).mean() > 10 * np.abs(got - want).mean()
    assert load_image(p, 3).shape == (48, 32, 3)
    # the cached path decodes the same way
    sp = DataSource(classes=["a"], splits={"train": [Sample(p, 0)]})
    scan = scan_images(sp.splits["train"], keep_decoded=True)
    assert scan.decoded[p].shape == (48, 32)


def test_alpha_and_palette_become_rgb(tmp_path):
    g = face_array()
    rgba = np.stack([g, 255 - g, g // 2, np.full_like(g, 7)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    got = load_image(tmp_path / "rgba.png", 3)
    assert got.shape == (48, 48, 3) and np.array_equal(got, rgba[:, :, :3])
    pal = Image.fromarray(g).convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "palette images with transparency" warning
        got = load_image(tmp_path / "p.png", 3)
        gray = load_image(tmp_path / "p.png", 1)
    assert got.shape == (48, 48, 3) and gray.shape == (48, 48, 1)
    assert np.abs(gray[:, :, 0].astype(int) - g).max() <= 1
    # RGB → 1 channel: PIL's luma, identical from a file and from the decoded cache
    Image.fromarray(rgba[:, :, :3]).save(tmp_path / "rgb.png")
    want = np.asarray(Image.open(tmp_path / "rgb.png").convert("L"))
    assert np.array_equal(load_image(tmp_path / "rgb.png", 1)[:, :, 0], want)


def test_cache_uses_the_decoded_images_from_the_check(tmp_path, monkeypatch):
    paths = faces(6)
    src = DataSource(classes=["a", "b"], splits={"train": [Sample(p, i % 2) for i, p in enumerate(paths[:4])],
                                                 "val": [Sample(p, i % 2) for i, p in enumerate(paths[4:])]})
    sp = make_splits(src, train_split="train", val_split="val", val_fraction=0.2, seed=0, skip_missing=False,
                     keep_decoded=True)
    assert set(sp.decoded) == set(paths)
    assert make_splits(src, train_split="train", val_split="val", val_fraction=0.2, seed=0,
                       skip_missing=False).decoded is None
    tf = eval_transform(Preprocessing(input_size=(32, 32), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    plain = ImageDataset(sp.train, tf, 3)
    want = [plain[i]["image"] for i in range(len(plain))]
    monkeypatch.setattr(fdata, "load_image", lambda *a: pytest.fail("read again"))
    cached = ImageDataset(sp.train, tf, 3, cache=True, decoded=sp.decoded)
    assert all(torch.equal(cached[i]["image"], w) for i, w in enumerate(want))


# ---------------------------------------------------------------------------- split warnings


def test_duplicates_between_train_and_val_are_warned(tmp_path):
    src_faces = faces(6)
    copies = []
    for i in range(4):  # four val images that are byte-for-byte copies of training images
        c = tmp_path / f"val_copy_{i}.jpg"
        c.write_bytes(src_faces[i].read_bytes())
        copies.append(c)
    reencoded = tmp_path / "reencoded.jpg"  # same face, different bytes: not an exact duplicate
    Image.open(src_faces[4]).save(reencoded, quality=70)
    train = [Sample(p, i % 2) for i, p in enumerate(src_faces)]
    val = [Sample(c, i % 2) for i, c in enumerate(copies)] + [Sample(reencoded, 0)]
    sp = make_splits(DataSource(classes=["a", "b"], splits={"train": train, "val": val}), train_split="train",
                     val_split="val", val_fraction=0.2, seed=0, skip_missing=False)
    (w,) = [w for w in sp.warnings if "exact copies" in w]
    assert w.startswith("4 validation image(s) are exact copies of training images")
    for i in range(3):  # up to three example pairs
        assert f"{src_faces[i]} = {copies[i]}" in w
    assert str(copies[3]) not in w and w.endswith(", …") and str(reencoded) not in w
    no_dup = make_splits(DataSource(classes=["a", "b"], splits={"train": train, "val": [Sample(reencoded, 0)]}),
                         train_split="train", val_split="val", val_fraction=0.2, seed=0, skip_missing=False)
    assert not any("exact copies" in w for w in no_dup.warnings)


def test_class_missing_from_val_or_train(tmp_path):
    p = faces(6)
    src = DataSource(classes=["angry", "happy", "sad"],
                     splits={"train": [Sample(p[0], 0), Sample(p[1], 1), Sample(p[2], 2)],
                             "val": [Sample(p[3], 0), Sample(p[4], 1)]})
    sp = make_splits(src, train_split="train", val_split="val", val_fraction=0.2, seed=0, skip_missing=False)
    assert sp.warnings == ("1 class(es) have no validation images: sad",)
    src = DataSource(classes=["angry", "happy", "sad"],
                     splits={"train": [Sample(p[0], 0), Sample(p[1], 0)], "val": [Sample(p[3], 0), Sample(p[4], 2)]})
    sp = make_splits(src, train_split="train", val_split="val", val_fraction=0.2, seed=0, skip_missing=False)
    assert sp.warnings == ("2 class(es) have no training images: happy, sad",
                           "1 class(es) have no validation images: happy")
    # a clean split has none
    src = DataSource(classes=["a", "b"], splits={"train": [Sample(p[0], 0), Sample(p[1], 1)],
                                                 "val": [Sample(p[3], 0), Sample(p[4], 1)]})
    assert make_splits(src, train_split="train", val_split="val", val_fraction=0.2, seed=0,
                       skip_missing=False).warnings == ()


# ------------------------------------------------------------------------------- eval resize


def cv2_reference(img: np.ndarray, h: int, w: int) -> np.ndarray:
    import cv2  # the test compares against it; fer_core itself no longer imports it

    out = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out


#: torch bilinear (float) vs cv2 INTER_LINEAR (fixed point, rounded to uint8), in grey levels
RESIZE_MAX_DIFF = 1.0 + 1e-4  # one grey level (the eval resize rounds to whole levels, as cv2 does)
RESIZE_MEAN_DIFF = 0.35


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (112, 112), (224, 224), (40, 56), (47, 49)])
def test_eval_resize_matches_cv2_on_real_faces(size):
    h, w = size
    worst, means = 0.0, []
    for i, p in enumerate(faces(8)):
        g = load_image(p, 1)
        other = load_image(faces(8)[(i + 1) % 8], 1)
        rgb = np.concatenate([g, other, 255 - g], axis=2)
        for img, ch in ((g, 1), (rgb, 3)):
            pre = Preprocessing(input_size=(h, w), channels=ch, mean=(0.5,) * ch, std=(0.25,) * ch)
            got = eval_transform(pre)(img)
            assert got.shape == (ch, h, w) and got.dtype == torch.float32
            levels = (got * 0.25 + 0.5) * 255.0  # back to grey levels
            ref = torch.from_numpy(cv2_reference(img, h, w)).permute(2, 0, 1).float()
            d = (levels - ref).abs()
            worst, means = max(worst, d.max().item()), means + [d.mean().item()]
    assert worst <= RESIZE_MAX_DIFF, worst
    assert float(np.mean(means)) <= RESIZE_MEAN_DIFF


def test_eval_resize_matches_cv2_on_noise_and_strong_downscale():
    """The worst case for cv2's fixed-point weights: random pixels; also 300→32 (no antialiasing)."""
    rng = np.random.default_rng(0)
    for shape, (h, w) in [((100, 100, 3), (112, 112)), ((300, 200, 3), (32, 32)), ((37, 91, 1), (17, 45))]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        ch = shape[2]
        got = eval_transform(Preprocessing(input_size=(h, w), channels=ch, mean=(0.0,) * ch, std=(1.0,) * ch))(img)
        ref = torch.from_numpy(cv2_reference(img, h, w)).permute(2, 0, 1).float()
        assert (got * 255.0 - ref).abs().max().item() <= RESIZE_MAX_DIFF


def test_eval_transform_without_resize_is_exact():
    g = load_image(faces(1)[0], 1)
    pre = Preprocessing(input_size=(48, 48), channels=1, mean=(0.5,), std=(0.25,))
    want = (torch.from_numpy(g.copy()).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.25
    assert torch.equal(eval_transform(pre)(g), want)


def test_fer_core_data_imports_no_heavy_dependency():
    code = ("import sys, fer_core.data; bad = [m for m in ('cv2', 'timm', 'albumentations', 'mlflow', 'optuna', "
            "'transformers', 'onnx') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------- CLI


def test_cli_data_names_a_truncated_jpeg(tmp_path):
    rows = list(csv.DictReader((FER2013 / "labels.csv").open()))
    picked = {}
    for r in rows:  # two real faces per class and split
        if sum(1 for k in picked if k[:2] == (r["split"], r["label_id"])) < 2:
            picked[(r["split"], r["label_id"], r["path"])] = r
    bad = truncated_jpeg(tmp_path / "cut face.jpg")
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "label_id", "split"])
        for r in picked.values():
            w.writerow([r["path"], r["label"], r["label_id"], r["split"]])
        w.writerow([str(bad), "happy", "3", "train"])
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nplugin = "csv"\nroot = "{FER2013}"\nlabels = "{labels}"\n'
                      '[model.backbone]\nplugin = "timm"\nname = "resnet10t"\n')
    exe = Path(sys.executable).parent / "fer"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "fer_core.cli"]
    r = subprocess.run([*cmd, "data", str(recipe)], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: 1 image(s) missing or unreadable: ") and f"{bad} (truncated" in lines[0]
