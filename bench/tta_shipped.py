"""Test-time augmentation on the shipped model: none vs mirror vs ten-crop, FER2013 val.

Stage 3 of the staircase adds ten-crop TTA to a model trained for it; this measures what the views
give a model that is already trained and shipped (`default`), where it costs nothing but time.
One `fer eval` per view set into bench/results/tta/<model>_<views>.json (skipped when present), and
the "tta on the shipped model" section of docs/results.md rewritten from them.

    .venv/bin/python bench/tta_shipped.py                 # the shipped model 'default'
    .venv/bin/python bench/tta_shipped.py --model runs/x  # any run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from machine import cpu_name  # noqa: E402
from results_doc import update_section  # noqa: E402

RECORDS = REPO / "bench" / "results" / "tta"
TEN_CROP = 'tta={ plugin = "standard", identity = false, crops = 5, crop_fraction = 0.9, hflip = true }'
VIEWS = {"none": [], "flip": ["--tta", "-o", 'tta={ plugin = "standard", hflip = true }'],
         "tencrop": ["--tta", "-o", TEN_CROP]}
WHAT = {"none": "the image as it is", "flip": "+ its mirror image (2 views)",
        "tencrop": "ten-crop: 4 corners + centre at 90 %, each mirrored (10 views)"}


def record(model: str, views: str) -> Path:
    return RECORDS / f"{re.sub(r'[^A-Za-z0-9]+', '-', model).strip('-')}_{views}.json"


def cpus(model: str) -> str:
    return ", ".join(sorted({json.loads(p.read_text()).get("cpu", "unknown") for v in VIEWS
                             if (p := record(model, v)).is_file()})) or "—"


def report(model: str) -> str:
    lines = ["## TTA on the shipped model", "",
             f"`bench/tta_shipped.py --model {model}`: FER2013 val (3,589 faces), calibrated probabilities averaged",
             "over the views. One trained model, so no spread over seeds; Δ against no TTA. ms per image: batched",
             f"`fer eval` (CPU: {cpus(model)}).", "",
             "| views | accuracy | macro-F1 | Δ acc | ECE (calibrated) | ms/image |", "|---|---|---|---|---|---|"]
    base = None
    for views in VIEWS:
        p = record(model, views)
        if not p.is_file():
            continue
        r = json.loads(p.read_text())
        base = r["accuracy"] if base is None else base
        lines.append(f"| {WHAT[views]} | {100 * r['accuracy']:.2f} | {100 * r['macro_f1']:.2f} | "
                     f"{100 * (r['accuracy'] - base):+.2f} | {r['calibration']['ece_calibrated']:.3f} | "
                     f"{r['inference']['batched_ms_per_image']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="a shipped model's name or a run directory")
    args = ap.parse_args()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    for views, extra in VIEWS.items():
        p = record(args.model, views)
        if p.is_file():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(REPO / ".venv" / "bin" / "fer"), "eval", args.model, *extra, "--json", str(p)]
        if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
            sys.exit(f"fer eval failed for {views}")
        r = json.loads(p.read_text())
        p.write_text(json.dumps({**r, "cpu": cpu_name()}, indent=2) + "\n")  # the ms/image are this CPU's
    update_section("tta on the shipped model", report(args.model))


if __name__ == "__main__":
    main()
