"""Latency and detection benchmarks for `fer predict` (issue 13's "Measure"); resumable.

Section ``detection`` (this file so far): the face detector alone, on real FER2013 validation
faces pasted into larger scenes.

- **recall by face size**: the same 120 randomly drawn faces (uncurated: profile, occluded and
  blurred FER2013 faces included) pasted at each side length into 640×480 scenes (the coffee
  photo scikit-image ships, or smooth coloured noise), up to six per scene on a jittered grid;
  a face is found when a detection has IoU ≥ 0.5 with the pasted square. Recall and false
  positives per scene are given at several score thresholds (one pass with ``min_score = 0``;
  MTCNN's own last-stage threshold, 0.7, still applies).
- **ms per image**: scenes of 640×480 and 1280×720 with three 96-pixel faces, one image at a
  time and in batches of 8 equal-size frames (video), at the given thread count; the median
  over repeats after a warm-up.

Every measurement is one small JSON record under bench/results/latency/detection/; a record
that exists is not measured again, so rerunning the script carries on where it stopped. The
section of the results page (docs/results.md by default, ``--doc``) is rewritten from the
records.

    .venv/bin/python bench/latency.py                      # measure what is missing, write the table
    .venv/bin/python bench/latency.py --faces 30 --threads 1 2
    .venv/bin/python bench/latency.py --report-only
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

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # run as a script or imported by tests

import numpy as np  # noqa: E402

from fer_core.api import atomic_write_text, get_registry  # noqa: E402
from results_doc import RESULTS, update_section  # noqa: E402

FER2013 = (REPO.parent / "shared" / "data" / "fer2013").resolve()
RECORDS = REPO / "bench" / "results" / "latency" / "detection"
SIDES = (20, 24, 32, 48, 64, 96, 128, 192, 256)
THRESHOLDS = (0.7, 0.9, 0.95)
SCENE = (640, 480)  # w, h
SPEED_SIZES = ((640, 480), (1280, 720))
SECTION = "latency-detection"


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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"platform": platform.platform(), "processor": _cpu_name(),
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=["detection"], default="detection")
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--faces", type=int, default=120, help="FER2013 faces per size (recall)")
    ap.add_argument("--sides", type=int, nargs="*", default=list(SIDES))
    ap.add_argument("--threads", type=int, nargs="*", default=[1])
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--doc", type=Path, default=RESULTS, help="the page whose section is rewritten")
    args = ap.parse_args(argv)
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
