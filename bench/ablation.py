"""Ablation of the plan's training techniques on real faces; resumable.

FER2013: the baseline recipe, each technique added alone, and all together, 3 seeds each.
FER2013 at 20 epochs: baseline, strong augmentation and all together, one seed (do the heavy
regularizers just need longer training?).
CK+: emotion-only vs AU-only vs multi-task (emotion + AU), subject-independent folds, 3 seeds.

Every run is a real `fer run` (subprocess) into bench/out/ablation/<suite>/<config>/...; its
figures go to a small committed record bench/results/ablation/<suite>/<config>/<run>.json. A run
with a record is skipped, a run with a checkpoint but no record is resumed, so starting the
script again (in this session or a later one) carries on where it stopped. After each run the
ablation section of docs/results.md is rewritten (atomically) from every record so far.

    .venv/bin/python bench/ablation.py                 # everything
    .venv/bin/python bench/ablation.py --suite fer2013 --seeds 0 1 2
    .venv/bin/python bench/ablation.py --report-only   # just rebuild docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # run as a script or imported by tests
from fer_core.api import atomic_write_text  # noqa: E402
from results_doc import RESULTS, update_section  # noqa: E402

OUT = REPO / "bench" / "out" / "ablation"  # run directories (checkpoints): not committed
RECORDS = REPO / "bench" / "results" / "ablation"  # one small JSON per finished run: committed

# technique → overrides added to the baseline recipe (TOML values)
FER_BASE = "recipes/ablation/fer2013_baseline.toml"
STRONG = 'augment={ plugin = "albumentations", preset = "strong" }'
MIX = 'batch_transforms=[{ plugin = "mix", mixup_alpha = 0.2, cutmix_alpha = 1.0, prob = 1.0, switch_prob = 0.5, off_last_epochs = 1 }]'
FOCAL = 'loss={ plugin = "focal", gamma = 2.0, alpha = "none" }'
SMOOTH = 'loss={ plugin = "label_smoothing", smoothing = 0.1 }'
WEIGHTED = 'loss={ plugin = "weighted_cross_entropy", weights = "effective", beta = 0.999 }'
OVERSAMPLE = 'sampler={ plugin = "oversample", power = 1.0 }'
WARMUP = 'schedule={ plugin = "warmup_cosine", warmup_epochs = 1, min_lr = 1e-5 }'
FER_CONFIGS: dict[str, list[str]] = {
    "baseline": [],
    "+strong_augmentation": [STRONG],
    "+mixup_cutmix": [MIX],
    "+focal_loss": [FOCAL],
    "+label_smoothing": [SMOOTH],
    "+class_weighted_ce": [WEIGHTED],
    "+oversampling": [OVERSAMPLE],
    "+warmup_cosine": [WARMUP],
    "all_together": [STRONG, MIX, FOCAL, WARMUP, OVERSAMPLE],
}

# 6 epochs is what 27 runs on 2 cores allow; heavy regularizers may need longer to pay off, so a
# smaller check repeats the baseline and the two heaviest configurations at 20 epochs
# (StepLR's step moved to keep its position at 2/3 of training).
LONG_EPOCHS = 20
LONG_STEP = 14
LONG_OVERRIDES = [f"train.epochs={LONG_EPOCHS}", f"schedule.step_size={LONG_STEP}"]
LONG_CONFIGS = ["baseline", "+strong_augmentation", "all_together"]

CK_BASE = "recipes/ckplus_multitask.toml"
CK_CONFIGS: dict[str, list[str]] = {
    "emotion_only": ['model.heads={ emotion = { plugin = "linear", dropout = 0.2 } }',
                     'loss={ plugin = "cross_entropy" }'],
    "au_only": ['loss={ plugin = "multitask", losses = { au = { plugin = "au_bce", pos_weight = "auto" } } }'],
    "multitask": [],
}
CK_FOLDS = ["1", "2", "3", "4", "5"]


def run_dir(suite: str, config: str, seed: int, fold: str | None) -> Path:
    name = config.replace("+", "plus_")
    return OUT / suite / name / (f"fold{fold}_seed{seed}" if fold else f"seed{seed}")


def command(suite: str, config: str, seed: int, fold: str | None) -> list[str]:
    base = CK_BASE if suite == "ckplus" else FER_BASE
    overrides = CK_CONFIGS[config] if suite == "ckplus" else FER_CONFIGS[config]
    if suite == "fer2013_long":  # before the configuration's own: a replaced schedule table wins
        overrides = [*LONG_OVERRIDES, *overrides]
    args = ["fer", "run", base, "--out", str(run_dir(suite, config, seed, fold).relative_to(REPO)),
            "-o", f"train.seed={seed}", "-o", f"name={suite}_{config}",
            "-o", f"tracking.uri=sqlite:///{(OUT / 'mlflow.db').relative_to(REPO)}"]
    if fold:
        args += ["-o", f"data.holdout_value={fold}"]
    for o in overrides:
        args += ["-o", o]
    return args


def record_path(suite: str, config: str, seed: int, fold: str | None) -> Path:
    return RECORDS / run_dir(suite, config, seed, fold).relative_to(OUT).with_suffix(".json")


def run_one(suite: str, config: str, seed: int, fold: str | None) -> dict | None:
    out = run_dir(suite, config, seed, fold)
    record = record_path(suite, config, seed, fold)
    if record.is_file():
        return json.loads(record.read_text())
    args = command(suite, config, seed, fold)
    if (out / "last.pt").is_file():  # interrupted earlier: continue it
        args = ["fer", "run", "--resume", str(out.relative_to(REPO))]
    exe = [str(REPO / ".venv" / "bin" / "fer"), *args[1:]]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    print(f"[{time.strftime('%H:%M:%S')}] {suite} {config} seed {seed}" + (f" fold {fold}" if fold else ""), flush=True)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = subprocess.run(exe, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(f"  failed (exit {proc.returncode}); see {out.parent / (out.name + '.log')}", flush=True)
        return None
    m = json.loads((out / "metrics.json").read_text())
    status = json.loads((out / "run.json").read_text())
    rec = {"suite": suite, "config": config, "seed": seed, "fold": fold, "accuracy": m["accuracy"],
           "macro_f1": m["macro_f1"], "balanced_accuracy": m["balanced_accuracy"], "au_mean_f1": m.get("au_mean_f1"),
           "best_epoch": m["best_epoch"], "seconds": round(time.time() - t0, 1), "precision": status.get("precision"),
           "command": shlex.join(command(suite, config, seed, fold))}
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(rec, indent=2) + "\n")
    print(f"  acc {rec['accuracy']:.4f}  macro-F1 {rec['macro_f1']:.4f}  ({rec['seconds']:.0f}s)", flush=True)
    return rec


def collect() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*/*/*.json"))]


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def fer_table(records: list[dict], configs: list[str]) -> list[str]:
    """Markdown rows: each configuration against the baseline of the same records."""
    lines = ["| configuration | n | accuracy | macro-F1 | Δ acc vs baseline | Δ macro-F1 | min/run |",
             "|---|---|---|---|---|---|---|"]
    base = [r for r in records if r["config"] == "baseline"]
    b_acc = statistics.mean(r["accuracy"] for r in base) if base else None
    b_f1 = statistics.mean(r["macro_f1"] for r in base) if base else None
    for config in configs:
        rs = [r for r in records if r["config"] == config]
        acc = [r["accuracy"] for r in rs]
        f1 = [r["macro_f1"] for r in rs]
        compare = rs and b_acc is not None and config != "baseline"
        d_acc = f"{100 * (statistics.mean(acc) - b_acc):+.2f}" if compare else ""
        d_f1 = f"{100 * (statistics.mean(f1) - b_f1):+.2f}" if compare else ""
        minutes = f"{statistics.mean(r['seconds'] for r in rs) / 60:.1f}" if rs else "—"
        lines.append(f"| {config} | {len(rs)} | {mean_std(acc)} | {mean_std(f1)} | {d_acc} | {d_f1} | {minutes} |")
    return lines


def report(records: list[dict], seeds: list[int]) -> str:
    lines = ["Produced by `bench/ablation.py` (resumable; rerun it to fill in missing rows) from real",
             "`fer run` invocations; each run's exact command and figures are in",
             "`bench/results/ablation/<suite>/<config>/<run>.json`. Values are percentages on the",
             "validation split, mean ± sample std over seeds (n = number of finished runs).", ""]
    fer = [r for r in records if r["suite"] == "fer2013"]
    lines = ["## Training techniques (ablation)", "", *lines]
    lines += ["### FER2013: each technique added alone to the baseline", "",
              "Setup (chosen so that the whole ablation fits a 2-core CPU in a few hours): ResNet-10t from",
              "scratch, 48×48 grayscale (FER2013's native size, no upsampling cost), all 28,709 training",
              "images, 6 epochs, batch 64, AdamW lr 2e-3, bf16 autocast where the CPU has it. Baseline =",
              "the plan's \"current status\": basic resize/flip, plain cross-entropy, StepLR (×0.1 at epoch 4).",
              "Validation = FER2013 PublicTest (`val`, 3,589 images); the private test split is untouched.", "",
              *fer_table(fer, list(FER_CONFIGS))]
    lines += ["", "Overrides per configuration (added to `recipes/ablation/fer2013_baseline.toml` with `-o`):", ""]
    for config, ovs in FER_CONFIGS.items():
        lines.append(f"- `{config}`: " + (", ".join(f"`{o}`" for o in ovs) if ovs else "none"))
    lines += ["", f"Command: `.venv/bin/python bench/ablation.py --suite fer2013 --seeds {' '.join(map(str, seeds))}`",
              "(one run: e.g. `" + shlex.join(command("fer2013", "+focal_loss", 0, None)) + "`)", ""]

    long = [r for r in records if r["suite"] == "fer2013_long"]
    lines += [f"### FER2013 at {LONG_EPOCHS} epochs: do the heavy regularizers need longer training?", "",
              f"Same setup and overrides, but {LONG_EPOCHS} epochs (StepLR step at epoch {LONG_STEP}) and seed 0 only: a check",
              "of whether 6 epochs penalise strong augmentation and the all-together recipe, not a",
              "replacement for the 3-seed table above.", "",
              *fer_table(long, LONG_CONFIGS), "",
              "Command: `.venv/bin/python bench/ablation.py --suite fer2013_long --seeds 0`", ""]

    ck = [r for r in records if r["suite"] == "ckplus"]
    lines += ["### CK+: multi-task emotion + AU learning", "",
              f"Subject-independent folds {', '.join(CK_FOLDS)} of the 10 in `ckplus48_au/labels.csv` (each fold",
              "held out in turn; no subject on both sides), 3 seeds, ResNet-10t from scratch at 48×48, 30 epochs,",
              "recipe `recipes/ckplus_multitask.toml`. For each seed the folds are averaged; the table gives",
              "mean ± std of those per-seed averages. AU F1 = mean over AUs of per-AU F1 (threshold 0.5).", "",
              "| configuration | runs | accuracy | macro-F1 | AU mean F1 | min/run |", "|---|---|---|---|---|---|"]
    for config in CK_CONFIGS:
        rs = [r for r in ck if r["config"] == config]
        per_seed: dict[int, list[dict]] = {}
        for r in rs:
            per_seed.setdefault(r["seed"], []).append(r)
        def avg(key: str) -> list[float]:
            # only seeds whose every fold has finished: a partial fold set would bias the mean
            return [statistics.mean(x[key] for x in v) for v in per_seed.values()
                    if len(v) == len(CK_FOLDS) and all(x.get(key) is not None for x in v)]
        au = avg("au_mean_f1") if config != "emotion_only" else []
        acc = avg("accuracy") if config != "au_only" else []
        f1 = avg("macro_f1") if config != "au_only" else []
        minutes = f"{statistics.mean(r['seconds'] for r in rs) / 60:.1f}" if rs else "—"
        seeds_done = sum(len(v) == len(CK_FOLDS) for v in per_seed.values())
        lines.append(f"| {config} | {len(rs)} ({seeds_done} seeds complete) | {mean_std(acc)} | {mean_std(f1)} | "
                     f"{mean_std(au)} | {minutes} |")
    lines += ["", "`emotion_only` has no AU head; `au_only` trains only the AU head (its emotion head is",
              "untrained, so its accuracy is not reported); `multitask` = 0.7·CE + 0.3·AU-BCE.", "",
              f"Command: `.venv/bin/python bench/ablation.py --suite ckplus --seeds {' '.join(map(str, seeds))}`", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["fer2013", "ckplus", "fer2013_long", "all"], default="all",
                    help="all = fer2013 and ckplus for every seed, then fer2013_long for the first seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="*", help="only these configurations")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        jobs = []
        # seed-major order: a partial run still gives every configuration one seed first
        for seed in args.seeds:
            if args.suite in ("fer2013", "all"):
                jobs += [("fer2013", c, seed, None) for c in FER_CONFIGS]
            if args.suite in ("ckplus", "all"):
                jobs += [("ckplus", c, seed, f) for c in CK_CONFIGS for f in CK_FOLDS]
        long_seeds = args.seeds if args.suite == "fer2013_long" else args.seeds[:1] if args.suite == "all" else []
        jobs += [("fer2013_long", c, seed, None) for seed in long_seeds for c in LONG_CONFIGS]
        for suite, config, seed, fold in jobs:
            if args.configs and config not in args.configs:
                continue
            run_one(suite, config, seed, fold)
            update_section("ablation", report(collect(), args.seeds))
    update_section("ablation", report(collect(), args.seeds))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
