"""`fer predict`: facial expressions in photos, folders and videos (docs/predict.md).

INPUT… → frames (an image is one frame; a video every ``--every``-th frame, decoded by OpenCV)
→ faces (a `detector` plugin, batched over frames; ``--no-detect``: the image is the face) →
crops aligned as the model was trained (``faces.py``) → batched inference through the model's
``Predictor`` (its calibration applied) → one row per face, or one row saying "no face".

Unreadable files, empty folders and videos without a decodable frame are reported on stderr
(and under ``skipped`` in the JSON) and skipped: a bad input never stops the others, and the
exit code stays 0. Bad arguments are one line and exit code 2.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
import typer
from PIL import Image, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fer_core.api import (FerError, Overrides, Predictor, Preprocessing, apply_overrides,
                          atomic_write_text, autocast, console, eval_transform, get_registry, hookimpl, load_image,
                          load_predictor, shipped_model, sigmoid, softmax, stdout, warn)
from fer_plugins.faces import BOX_MARGIN, METHODS, TEMPLATES, Alignment, crop_face

# FFmpeg's own log lines ("moov atom not found") would duplicate the one line we print per bad video
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"})
#: what cv2.imwrite writes for annotated images (anything else is written as .png)
WRITABLE = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
DEFAULT_DETECTOR = "mtcnn"
#: frames detected together (equal-size frames share MTCNN's pyramid passes)
DETECT_BATCH = 8
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
NO_SHIPPED_MODEL = ("--model: no shipped model is installed yet; pass a trained model: --model RUN_DIR "
                    "(a `fer run` directory, an ensemble directory or an exported model file)")


# ------------------------------------------------------------------ inputs


@dataclass
class Input:
    """One file to read: ``rel`` is its name under ``--annotate``."""

    path: Path
    rel: Path
    video: bool
    fps: float = 0.0


@dataclass
class Face:
    box: np.ndarray  # x1, y1, x2, y2 (the whole image with --no-detect)
    score: float | None
    landmarks: np.ndarray | None  # 5×2
    crop: np.ndarray  # the model's input, uint8 H×W×C
    probs: np.ndarray | None = None
    au: np.ndarray | None = None


@dataclass
class Frame:
    source: Input
    index: int | None  # video frame number (None: an image)
    time: float | None  # seconds into the video
    image: np.ndarray | None  # RGB, kept only for --annotate
    size: tuple[int, int]  # (h, w)
    faces: list[Face] = field(default_factory=list)


def _skip(path: Path | str, reason: str) -> dict[str, str]:
    return {"source": str(path), "reason": reason}


def expand_inputs(inputs: Sequence[Path]) -> tuple[list[Input], list[dict[str, str]]]:
    """Files in argument order; folders recursively (images and videos by extension, sorted,
    hidden entries left out). Missing paths and empty folders are returned as skipped."""
    found: list[Input] = []
    skipped: list[dict[str, str]] = []
    seen: set[Path] = set()
    names: set[Path] = set()

    def add(f: Path, rel: Path) -> None:
        key = f.resolve()
        if key in seen:
            return
        seen.add(key)
        base, n = rel, 1
        while rel in names:  # two inputs of the same name: distinct annotated files
            rel = base.with_name(f"{base.stem}-{n}{base.suffix}")
            n += 1
        names.add(rel)
        found.append(Input(f, rel, f.suffix.lower() in VIDEO_EXTS))

    for p in inputs:
        p = Path(p)
        if p.is_dir():
            try:
                files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS and f.is_file()
                               and not any(part.startswith(".") for part in f.relative_to(p).parts))
            except OSError as e:
                skipped.append(_skip(p, f"folder cannot be read ({e.strerror or e})"))
                continue
            if not files:
                skipped.append(_skip(p, "empty folder: no image or video files in it"))
            for f in files:
                add(f, Path(p.resolve().name or "input") / f.relative_to(p))
        elif p.is_file():
            add(p, Path(p.name))
        elif p.exists():
            skipped.append(_skip(p, "not a file or folder"))
        else:
            skipped.append(_skip(p, "no such file or folder"))
    return found, skipped


def image_problem(path: Path, e: BaseException) -> str:
    """A short reason why an image could not be read."""
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, OSError) and not isinstance(e, UnidentifiedImageError) and getattr(e, "strerror", None):
        return f"cannot be read ({e.strerror})"
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError:
        pass
    if isinstance(e, UnidentifiedImageError):
        return "not an image (no image format recognises its contents)"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large ({e})"
    if "truncated" in str(e).lower():
        return "truncated image"
    return f"cannot be decoded ({type(e).__name__}: {e})".replace(": )", ")")


def read_frames(inp: Input, every: int, keep_image: bool,
                skipped: list[dict[str, str]]) -> Iterator[tuple[Frame, np.ndarray]]:
    """(frame, RGB image) for an image file, or for every ``every``-th frame of a video."""
    if not inp.video:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                rgb = load_image(inp.path, 3)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to decode a file is that file's fault
            skipped.append(_skip(inp.path, image_problem(inp.path, e)))
            return
        rgb = np.ascontiguousarray(rgb)
        yield Frame(inp, None, None, rgb if keep_image else None, rgb.shape[:2]), rgb
        return
    cap = cv2.VideoCapture(str(inp.path))
    try:
        if not cap.isOpened():
            skipped.append(_skip(inp.path, "cannot be opened as a video"))
            return
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        inp.fps = fps if np.isfinite(fps) and fps > 0 else 0.0
        index = decoded = 0
        while cap.grab():
            if index % every == 0:
                ok, bgr = cap.retrieve()
                if ok and bgr is not None and bgr.size:
                    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if bgr.ndim == 3 else cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
                    decoded += 1
                    t = index / inp.fps if inp.fps else None
                    yield Frame(inp, index, t, rgb if keep_image else None, rgb.shape[:2]), rgb
            index += 1
        if decoded == 0:
            skipped.append(_skip(inp.path, "no video frame could be decoded"))
    finally:
        cap.release()


# ------------------------------------------------------------------ faces and inference


def default_model() -> str:
    """The model used when ``--model`` is not given: the shipped model named ``default``."""
    if shipped_model("default") is None:
        raise FerError(NO_SHIPPED_MODEL)
    return "default"


def au_probabilities(pred: Predictor, x: torch.Tensor, pre: Preprocessing) -> np.ndarray | None:
    """AU probabilities of a batch prepared with the predictor's own preprocessing, when the
    model has an AU head: an artifact's ``au_logits(images, pre)`` if it offers one, else the
    run's model (``RunPredictor.model``)."""
    if not pred.au_names:
        return None
    fn = getattr(pred, "au_logits", None)
    if callable(fn):
        return sigmoid(np.asarray(fn(x, pre), dtype=np.float64))
    model = getattr(pred, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    precision = getattr(pred, "precision", None)
    with torch.no_grad():
        model.eval()
        xs = x.to(pred.device)
        if precision is not None:
            with autocast(pred.device, precision):
                out = model(xs)
        else:
            out = model(xs)
    return sigmoid(out["au"].float().cpu().numpy()) if "au" in out else None


@dataclass
class Stats:
    frames: int = 0
    faces: int = 0
    no_face: int = 0
    detect_s: float = 0.0
    infer_s: float = 0.0


class Predicting:
    """Frames in, rows out: detection in chunks of ``DETECT_BATCH`` frames, inference in
    batches of ``batch`` faces gathered across frames (and images)."""

    def __init__(self, pred: Predictor, detector: Any, align: Alignment, batch: int,
                 emit: Callable[[Frame], None], keeps_images: bool = False) -> None:
        self.pred, self.detector, self.align, self.batch, self.emit = pred, detector, align, batch, emit
        #: frames waiting for their faces' inference (fewer when they hold whole images to annotate)
        self.max_pending = 2 * DETECT_BATCH if keeps_images else max(batch, DETECT_BATCH)
        self.pre = pred.preprocessing
        self.transform = eval_transform(self.pre)
        self.chunk: list[tuple[Frame, np.ndarray]] = []
        self.pending: list[Frame] = []
        self.stats = Stats()

    def add(self, frame: Frame, rgb: np.ndarray) -> None:
        self.chunk.append((frame, rgb))
        if len(self.chunk) >= DETECT_BATCH:
            self._detect()

    def _detect(self) -> None:
        if not self.chunk:
            return
        images = [rgb for _, rgb in self.chunk]
        t0 = time.perf_counter()
        if self.detector is None:
            found = [(np.array([[0, 0, im.shape[1], im.shape[0]]], np.float32), None, None) for im in images]
        elif hasattr(self.detector, "detect_batch"):
            found = self.detector.detect_batch(images)
        else:
            found = [self.detector(im) for im in images]
        self.stats.detect_s += time.perf_counter() - t0
        for (frame, rgb), (boxes, scores, marks) in zip(self.chunk, found):
            for k in range(len(boxes)):
                lm = None if marks is None else np.asarray(marks[k], np.float32)
                box = np.asarray(boxes[k], np.float32)[:4]
                crop = crop_face(rgb, box if self.detector is not None else None, lm, self.align, self.pre)
                frame.faces.append(Face(box, None if scores is None else float(scores[k]), lm, crop))
            self.pending.append(frame)
        self.stats.frames += len(self.chunk)
        self.chunk = []
        if sum(len(f.faces) for f in self.pending) >= self.batch or len(self.pending) >= self.max_pending:
            self._infer()

    def _infer(self) -> None:
        faces = [face for frame in self.pending for face in frame.faces]
        t0 = time.perf_counter()
        for i in range(0, len(faces), self.batch):
            part = faces[i:i + self.batch]
            x = torch.stack([self.transform(f.crop) for f in part])
            probs = softmax(self.pred.logits(x, self.pre, calibrated=True).float().cpu().numpy())
            au = au_probabilities(self.pred, x, self.pre)
            for j, f in enumerate(part):
                f.probs = probs[j]
                f.au = None if au is None else au[j]
        self.stats.infer_s += time.perf_counter() - t0
        for frame in self.pending:
            self.stats.faces += len(frame.faces)
            self.stats.no_face += not frame.faces
            self.emit(frame)
        self.pending = []

    def flush(self) -> None:
        self._detect()
        self._infer()


def _r(v: float, nd: int = 2) -> float:
    return round(float(v), nd)


def rows_of(frame: Frame, classes: Sequence[str], au_names: Sequence[str]) -> list[dict[str, Any]]:
    base = {"source": str(frame.source.path), "frame": frame.index,
            "time_s": None if frame.time is None else round(frame.time, 4)}
    empty = {"box": None, "score": None, "landmarks": None, "top": None, "top_prob": None, "probs": None}
    if not frame.faces:
        return [{**base, "face": None, "status": "no face", **empty, **({"au": None} if au_names else {})}]
    rows = []
    for k, f in enumerate(frame.faces):
        top = int(np.argmax(f.probs))
        row = {**base, "face": k, "status": "ok", "box": [_r(v, 1) for v in f.box],
               "score": None if f.score is None else _r(f.score, 4),
               "landmarks": None if f.landmarks is None else [[_r(x, 1), _r(y, 1)] for x, y in f.landmarks],
               "top": classes[top], "top_prob": _r(f.probs[top], 4),
               "probs": {c: _r(p, 4) for c, p in zip(classes, f.probs)}}
        if au_names:
            row["au"] = None if f.au is None else {a: _r(p, 4) for a, p in zip(au_names, f.au)}
        rows.append(row)
    return rows


def csv_text(rows: Sequence[dict[str, Any]], classes: Sequence[str], au_names: Sequence[str]) -> str:
    cols = ["source", "frame", "time_s", "face", "status", "x1", "y1", "x2", "y2", "score",
            *(f"{n}_{a}" for n in LANDMARKS for a in "xy"), "top", "top_prob",
            *(f"p_{c}" for c in classes), *(f"au_{a}" for a in au_names)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        flat: dict[str, Any] = {k: r[k] for k in ("source", "frame", "time_s", "face", "status", "score", "top",
                                                  "top_prob")}
        if r["box"]:
            flat.update(zip(("x1", "y1", "x2", "y2"), r["box"]))
        for n, xy in zip(LANDMARKS, r["landmarks"] or []):
            flat[f"{n}_x"], flat[f"{n}_y"] = xy
        for c, p in (r["probs"] or {}).items():
            flat[f"p_{c}"] = p
        for a, p in (r.get("au") or {}).items():
            flat[f"au_{a}"] = p
        w.writerow({k: ("" if v is None else v) for k, v in flat.items()})
    return buf.getvalue()


# ------------------------------------------------------------------ annotation

_PALETTE = [(66, 135, 245), (52, 168, 83), (234, 67, 53), (251, 188, 5), (171, 71, 188), (0, 172, 193),
            (255, 112, 67), (124, 179, 66), (141, 110, 99), (120, 144, 156)]  # RGB


def draw(rgb: np.ndarray, faces: Sequence[Face], classes: Sequence[str]) -> np.ndarray:
    """A BGR copy of the frame with each face's box, landmarks and top class."""
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    t = max(1, round(max(img.shape[:2]) / 500))
    for f in faces:
        top = int(np.argmax(f.probs))
        color = tuple(int(c) for c in _PALETTE[top % len(_PALETTE)][::-1])
        x1, y1, x2, y2 = (int(round(v)) for v in f.box)
        cv2.rectangle(img, (x1, y1), (x2, y2), color, t)
        for x, y in ([] if f.landmarks is None else f.landmarks):
            cv2.circle(img, (int(round(x)), int(round(y))), t + 1, color, -1)
        label = f"{classes[top]} {f.probs[top]:.2f}"
        scale = 0.45 * t
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, t)
        y0 = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y2 + 2
        cv2.rectangle(img, (x1, y0), (x1 + tw + 4, y0 + th + base + 2), color, -1)
        cv2.putText(img, label, (x1 + 2, y0 + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), t,
                    cv2.LINE_AA)
    return img


class Annotator:
    """Annotated images under ``root`` (same relative names; ``.png`` appended to formats
    OpenCV does not write), videos as MPEG-4 files (``.mp4`` appended unless the name has it)
    made of the sampled frames, at fps / every."""

    def __init__(self, root: Path, classes: Sequence[str], every: int) -> None:
        self.root, self.classes, self.every = Path(root), list(classes), every
        self.writers: dict[Path, Any] = {}
        self.written: list[Path] = []

    def __call__(self, frame: Frame) -> None:
        if frame.image is None:
            return
        bgr = draw(frame.image, frame.faces, self.classes)
        src = frame.source
        if not src.video:
            out = self.root / src.rel
            if out.suffix.lower() not in WRITABLE:
                out = out.with_name(out.name + ".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            if cv2.imwrite(str(out), bgr):
                self.written.append(out)
            else:
                warn(f"{out}: the annotated image could not be written")
            return
        out = self.root / (src.rel if src.rel.suffix.lower() == ".mp4" else src.rel.with_name(src.rel.name + ".mp4"))
        writer = self.writers.get(out)
        if writer is None:
            out.parent.mkdir(parents=True, exist_ok=True)
            fps = src.fps / self.every if src.fps else 25.0 / self.every
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), max(fps, 1.0),
                                     (bgr.shape[1], bgr.shape[0]))
            if not writer.isOpened():
                warn(f"{out}: the annotated video could not be written")
            self.writers[out] = writer
            self.written.append(out)
        if writer.isOpened():
            writer.write(bgr)

    def close(self) -> None:
        for w in self.writers.values():
            w.release()
        self.writers = {}


# ------------------------------------------------------------------ the command


def parse_alignment(align: str, margin: float | None, template: str, no_detect: bool, pre: Preprocessing) -> Alignment:
    """``--align auto``: what the model's preprocessing says when it says it (a future
    ``alignment`` field), else the loose box FER2013-style models are trained on."""
    if no_detect:
        return Alignment("none")
    if align == "auto":
        stored = getattr(pre, "alignment", None)
        if isinstance(stored, dict) and stored.get("method") in METHODS:
            kw = {k: stored[k] for k in ("margin", "shift", "template") if k in stored}
            if margin is not None:
                kw["margin"] = margin
            return Alignment(stored["method"], **kw)
        align = "box"
    if align not in ("box", "similarity"):
        raise FerError(f"--align: unknown method '{align}' (expected auto, box or similarity)")
    return Alignment(align, margin if margin is not None else (BOX_MARGIN if align == "box" else 1.0),
                     template=template)


def detector_spec(name: str, options: Sequence[str], device: str | None) -> dict[str, Any]:
    """``--detector NAME -d key=value …`` validated against the plugin's keys (the [detect] table)."""
    reg = get_registry()
    spec = {"plugin": name, **apply_overrides({}, list(options))}
    accepted = reg.get("detector", name, "detect").params()
    if "device" in accepted and "device" not in spec and device is not None:
        spec["device"] = device
    return reg.validate("detector", spec, "detect")


def check_arguments(inputs: Sequence[Path] | None, json_out: Path | None, csv_out: Path | None, every: int,
                    batch: int, annotate: Path | None) -> None:
    if not inputs:
        raise FerError("INPUT: give at least one image, folder or video")
    if json_out is not None and csv_out is not None:
        raise FerError("--json and --csv: choose one output format")
    if every < 1:
        raise FerError(f"--every: {every} is not a frame stride (expected 1 or more)")
    if batch < 1:
        raise FerError(f"--batch: {batch} is not a batch size (expected 1 or more)")
    if annotate is not None and annotate.exists() and not annotate.is_dir():
        raise FerError(f"--annotate: {annotate} exists and is not a directory")
    for opt, p in (("--json", json_out), ("--csv", csv_out)):
        if p is not None and str(p) != "-" and p.is_dir():
            raise FerError(f"{opt}: {p} is a directory; expected a file name")


def print_rows(rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> None:
    table = Table(title=Text(f"{sum(r['status'] == 'ok' for r in rows)} face(s)"))
    table.add_column("source", overflow="fold", min_width=12)
    for col, j in (("frame", "right"), ("face", "right"), ("box", "left"), ("top", "left")):
        table.add_column(col, justify=j, no_wrap=True)
    wide = len(classes) <= 8
    for c in (classes if wide else ["top 3"]):
        table.add_column(c, justify="right")
    for r in rows:
        frame = "" if r["frame"] is None else f"{r['frame']}" + ("" if r["time_s"] is None else f" ({r['time_s']:.2f}s)")
        if r["status"] != "ok":
            table.add_row(Text(r["source"]), frame, "", Text(r["status"]), "", *([""] * (len(classes) if wide else 1)))
            continue
        box = ",".join(f"{v:.0f}" for v in r["box"])
        probs = r["probs"]
        cells = [f"{probs[c]:.2f}" for c in classes] if wide else \
            [", ".join(f"{c} {p:.2f}" for c, p in sorted(probs.items(), key=lambda kv: -kv[1])[:3])]
        table.add_row(Text(r["source"]), frame, str(r["face"]), box, Text(f"{r['top']} {r['top_prob']:.2f}"), *cells)
    stdout.print(table, crop=False)


def predict_command(inputs: Sequence[Path] | None, model: str, json_out: Path | None, csv_out: Path | None,
                    annotate: Path | None, every: int, batch: int, no_detect: bool, detector: str,
                    detector_options: Sequence[str], align: str, margin: float | None, template: str,
                    device: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    check_arguments(inputs, json_out, csv_out, every, batch, annotate)
    if template not in TEMPLATES:
        raise FerError(f"--template: unknown template '{template}' (expected one of {', '.join(TEMPLATES)})")
    if align not in ("auto", "box", "similarity"):
        raise FerError(f"--align: unknown method '{align}' (expected auto, box or similarity)")
    spec = None if no_detect else detector_spec(detector, detector_options, device)
    pred = load_predictor(default_model() if model == "default" else model, list(overrides), device)
    alignment = parse_alignment(align, margin, template, no_detect, pred.preprocessing)
    det = None if spec is None else get_registry().build("detector", spec, "detect")
    classes, au_names = list(pred.classes), list(pred.au_names)

    items, skipped = expand_inputs(inputs or [])
    for s in skipped:
        warn(f"{s['source']}: {s['reason']}; skipped")
    rows: list[dict[str, Any]] = []
    annotator = Annotator(annotate, classes, every) if annotate is not None else None

    def emit(frame: Frame) -> None:
        rows.extend(rows_of(frame, classes, au_names))
        if annotator is not None:
            annotator(frame)

    run = Predicting(pred, det, alignment, batch, emit, keeps_images=annotator is not None)
    progress = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[what]}"), TimeElapsedColumn(), console=console,
                        disable=not console.is_terminal, transient=True)
    t0 = time.perf_counter()
    try:
        with progress:
            task = progress.add_task("inputs", total=len(items), what="")
            for inp in items:
                before = len(skipped)
                n = 0
                for frame, rgb in read_frames(inp, every, annotator is not None, skipped):
                    run.add(frame, rgb)
                    n += 1
                    if inp.video and n % 10 == 0:
                        progress.update(task, what=f"{inp.path.name}: {n} frames")
                if inp.video:
                    run.flush()  # its frames are written, in order, before the next input
                for s in skipped[before:]:
                    warn(f"{s['source']}: {s['reason']}; skipped")
                progress.update(task, advance=1, what=inp.path.name)
            run.flush()
    finally:
        if annotator is not None:
            annotator.close()
    seconds = time.perf_counter() - t0
    st = run.stats
    summary = {"inputs": len(items), "frames": st.frames, "faces": st.faces, "frames_without_face": st.no_face,
               "skipped": len(skipped), "seconds": round(seconds, 3),
               "detect_ms_per_frame": round(1000 * st.detect_s / st.frames, 2) if st.frames and det else None,
               "infer_ms_per_face": round(1000 * st.infer_s / st.faces, 3) if st.faces else None}
    report = {"model": {"name": pred.name, **pred.describe()}, "classes": classes, "au_names": au_names,
              "preprocessing": pred.preprocessing.to_dict(), "detector": spec, "alignment": alignment.describe(),
              "every": every, "rows": rows, "skipped": skipped, "summary": summary}
    if json_out is not None:
        text = json.dumps(report, indent=2) + "\n"
        if str(json_out) == "-":
            typer.echo(text, nl=False)
        else:
            atomic_write_text(json_out, text)
    elif csv_out is not None:
        text = csv_text(rows, classes, au_names)
        if str(csv_out) == "-":
            typer.echo(text, nl=False)
        else:
            atomic_write_text(csv_out, text)
    else:
        print_rows(rows, classes)
    extra = f"; annotated files in {annotate}" if annotator is not None and annotator.written else ""
    console.print(f"{st.faces} face(s) in {st.frames} image(s)/frame(s) from {len(items)} input(s); "
                  f"{st.no_face} without a face; {len(skipped)} input(s) skipped{extra}",
                  markup=False, highlight=False)
    return report


# ------------------------------------------------------------------ hooks


@hookimpl
def register_commands(cli):
    @cli.command("predict", epilog="Examples: fer predict photo.jpg --model runs/quickstart ;  "
                                   "fer predict clips/ --model runs/q --every 5 --json faces.json --annotate out/ ;  "
                                   "fer predict crops/ --no-detect --csv crops.csv --model runs/q")
    def predict_(
        inputs: Annotated[Optional[list[Path]], typer.Argument(help="Images, folders (recursive) and videos.",
                                                               show_default=False, metavar="INPUT...")] = None,
        model: Annotated[str, typer.Option("--model", "-m", help="A run directory, an ensemble, an exported model; "
                                                                 "'default': the shipped model.")] = "default",
        json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every row (and what was skipped) as "
                                                                        "JSON to this file ('-': stdout).")] = None,
        csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write one CSV line per face to this file "
                                                                      "('-': stdout).")] = None,
        annotate: Annotated[Optional[Path], typer.Option("--annotate", help="Write annotated images and videos "
                                                                            "(boxes, labels) into this directory.")] = None,
        every: Annotated[int, typer.Option("--every", help="Videos: use every N-th frame.")] = 1,
        batch: Annotated[int, typer.Option("--batch", help="Faces per inference batch.")] = 64,
        no_detect: Annotated[bool, typer.Option("--no-detect", help="The inputs are face crops: no detection, "
                                                                    "no alignment.")] = False,
        detector: Annotated[str, typer.Option("--detector", help="Detector plugin (`fer plugins detector`).")] =
        DEFAULT_DETECTOR,
        detector_option: Annotated[Optional[list[str]], typer.Option("--detector-option", "-d", metavar="KEY=VALUE",
                                                                     help="A detector parameter, e.g. -d min_score=0.95 "
                                                                          "(repeatable).")] = None,
        align: Annotated[str, typer.Option("--align", help="auto (the model's own, else box), box (margin-expanded "
                                                           "square, FER2013-style loose crops) or similarity (5 "
                                                           "landmarks to a template).")] = "auto",
        margin: Annotated[Optional[float], typer.Option("--margin", help=f"box: crop side / sqrt(box w*h) (default "
                                                                         f"{BOX_MARGIN}); similarity: zoom-out "
                                                                         f"(default 1).")] = None,
        template: Annotated[str, typer.Option("--template", help="similarity: fer2013 or arcface.")] = "fer2013",
        device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, auto (default: the run's).")] = None,
        override: Overrides = None,
    ) -> None:
        """Find faces in images, folders and videos and predict their expressions (calibrated)."""
        predict_command(inputs, model, json_out, csv_out, annotate, every, batch, no_detect, detector,
                        detector_option or [], align, margin, template, device, override or [])
