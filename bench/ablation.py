"""Ablation of the plan's training techniques on real faces; resumable.

FER2013: the baseline recipe, each technique added alone, and all together, 3 seeds each.
FER2013 at 20 epochs: baseline, strong augmentation and all together, one seed (do the heavy
regularizers just need longer training?).
CK+: emotion-only vs AU-only vs multi-task (emotion + AU), subject-independent folds, 3 seeds.

Each (suite, configuration[, CK+ fold]) is one real `fer repeat RECIPE --seeds ...` (subprocess)
into bench/out/ablation/<suite>/<config>[/fold<F>] (runs DIR/seed-N, summary DIR/repeat.json);
each seed's figures go to a small committed record
bench/results/ablation/<suite>/<config>/[fold<F>_]seed<N>.json. Seeds with a record are not asked
for again (a configuration whose every requested seed has one is skipped), and `fer repeat`
resumes an interrupted seed, so starting the script again (in this session or a later one)
carries on where it stopped. After each `fer repeat` the ablation section of docs/results.md is
rewritten (atomically) from every record so far.

    .venv/bin/python bench/ablation.py                 # everything
    .venv/bin/python bench/ablation.py --suite fer2013 --seeds 0 1 2
    .venv/bin/python bench/ablation.py --report-only   # just rebuild docs/results.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # run as a script or imported by tests
from fer_core.api import atomic_write_text  # noqa: E402
from results_doc import RESULTS, update_section  # noqa: E402

OUT = REPO / "bench" / "out" / "ablation"  # run directories (checkpoints): not committed
RECORDS = REPO / "bench" / "results" / "ablation"  # one small JSON per finished run: committed
FER = REPO / ".venv" / "bin" / "fer"
REPEAT_JSON = "repeat.json"  # fer_plugins.crossval.REPEAT_JSON
SEED_DONE = re.compile(r"seed-(-?\d+): (trained|resumed|finished earlier)")  # fer repeat, after each seed

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


def config_dir(suite: str, config: str) -> str:
    return f"{suite}/{config.replace('+', 'plus_')}"


def repeat_dir(suite: str, config: str, fold: str | None) -> Path:
    """The `fer repeat` directory of one (suite, configuration, fold): its runs are DIR/seed-N.
    One directory per (suite, configuration, fold), always given the same overrides, so `fer
    repeat`'s saved plan matches on every later call, whichever seeds it is asked for."""
    d = OUT / config_dir(suite, config)
    return d / f"fold{fold}" if fold else d


def overrides(suite: str, config: str, fold: str | None) -> list[str]:
    """The recipe overrides of one (suite, configuration, fold); the seed is `fer repeat`'s."""
    ovs = CK_CONFIGS[config] if suite == "ckplus" else FER_CONFIGS[config]
    if suite == "fer2013_long":  # before the configuration's own: a replaced schedule table wins
        ovs = [*LONG_OVERRIDES, *ovs]
    return [f"name={suite}_{config}", f"tracking.uri=sqlite:///{_rel(OUT / 'mlflow.db')}",
            *([f"data.holdout_value={fold}"] if fold else []), *ovs]


def command(suite: str, config: str, seeds: Sequence[int], fold: str | None) -> list[str]:
    base = CK_BASE if suite == "ckplus" else FER_BASE
    args = ["fer", "repeat", base, "--seeds", ",".join(map(str, seeds)), "--out", str(_rel(repeat_dir(suite, config, fold)))]
    for o in overrides(suite, config, fold):
        args += ["-o", o]
    return args


def _rel(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def record_path(suite: str, config: str, seed: int, fold: str | None) -> Path:
    """One committed record per run; the names predate `fer repeat` (its run dirs were
    bench/out/ablation/<suite>/<config>/[fold<F>_]seed<N>) and stay as they are."""
    return RECORDS / config_dir(suite, config) / (f"fold{fold}_seed{seed}.json" if fold else f"seed{seed}.json")


def missing_seeds(suite: str, config: str, fold: str | None, seeds: Sequence[int]) -> list[int]:
    return [s for s in seeds if not record_path(suite, config, s, fold).is_file()]


def _seconds_in_run_json(status: dict) -> float | None:
    """Training time of the run's last session (started → ended in run.json): the figure for a
    seed that `fer repeat` found finished by an earlier, interrupted call."""
    try:
        return round((dt.datetime.fromisoformat(status["ended"]) - dt.datetime.fromisoformat(status["started"])).total_seconds(), 1)
    except (KeyError, TypeError, ValueError):
        return None


def run_configuration(suite: str, config: str, fold: str | None, seeds: Sequence[int]) -> list[dict] | None:
    """One `fer repeat` over the seeds without a record, then one record per finished seed.
    None: every seed already had a record (nothing ran)."""
    todo = missing_seeds(suite, config, fold, seeds)
    if not todo:
        return None
    out = repeat_dir(suite, config, fold)
    args = command(suite, config, todo, fold)
    exe = [str(FER), *args[1:]]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    print(f"[{time.strftime('%H:%M:%S')}] {suite} {config}" + (f" fold {fold}" if fold else "")
          + f" seeds {', '.join(map(str, todo))}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "repeat.log"
    # each seed's wall time (process start-up and data loading included, as for a `fer run`):
    # from the previous seed's "seed-N: trained" line (or the start) to its own
    seconds: dict[int, float] = {}
    done: set[int] = set()
    last = time.time()
    with open(log_path, "a", encoding="utf-8") as log, subprocess.Popen(
            exe, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            encoding="utf-8", errors="replace") as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if m := SEED_DONE.fullmatch(line.strip()):
                now = time.time()
                done.add(int(m[1]))
                if m[2] != "finished earlier":
                    seconds[int(m[1])] = round(now - last, 1)
                last = now
    summary = json.loads((out / REPEAT_JSON).read_text()) if proc.returncode == 0 else {}
    if summary.get("seeds") == todo:
        runs = {r["seed"]: (out / r["dir"], r["metrics"]) for r in summary["runs"]}
    else:  # failed part-way: record the seeds it finished (their metrics.json), rerun for the rest
        print(f"  failed (exit {proc.returncode}); see {log_path}", flush=True)
        runs = {s: (out / f"seed-{s}", json.loads((out / f"seed-{s}" / "metrics.json").read_text()))
                for s in todo if s in done and (out / f"seed-{s}" / "metrics.json").is_file()}
    records = []
    for seed, (run, m) in runs.items():
        status = json.loads((run / "run.json").read_text())
        rec = {"suite": suite, "config": config, "seed": seed, "fold": fold, "accuracy": m["accuracy"],
               "macro_f1": m["macro_f1"], "balanced_accuracy": m["balanced_accuracy"], "au_mean_f1": m.get("au_mean_f1"),
               "best_epoch": int(m["best_epoch"]), "seconds": seconds.get(seed, _seconds_in_run_json(status)),
               "precision": status.get("precision"), "command": shlex.join(args)}
        record = record_path(suite, config, seed, fold)
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(rec, indent=2) + "\n")
        print(f"  seed {seed}: acc {rec['accuracy']:.4f}  macro-F1 {rec['macro_f1']:.4f}  ({rec['seconds'] or 0:.0f}s)",
              flush=True)
        records.append(rec)
    return records


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
              "(one configuration: e.g. `" + shlex.join(command("fer2013", "+focal_loss", seeds, None)) + "`)", ""]

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


def jobs(suite: str, seeds: list[int]) -> list[tuple[str, str, str | None, list[int]]]:
    """(suite, configuration, fold, seeds): one `fer repeat` each, in this order."""
    out: list[tuple[str, str, str | None, list[int]]] = []
    if suite in ("fer2013", "all"):
        out += [("fer2013", c, None, seeds) for c in FER_CONFIGS]
    if suite in ("ckplus", "all"):
        out += [("ckplus", c, f, seeds) for c in CK_CONFIGS for f in CK_FOLDS]
    long_seeds = seeds if suite == "fer2013_long" else seeds[:1] if suite == "all" else []
    if long_seeds:
        out += [("fer2013_long", c, None, long_seeds) for c in LONG_CONFIGS]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["fer2013", "ckplus", "fer2013_long", "all"], default="all",
                    help="all = fer2013 and ckplus for every seed, then fer2013_long for the first seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="*", help="only these configurations")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.seeds = list(dict.fromkeys(args.seeds))  # fer repeat takes distinct seeds
    if not args.report_only:
        for suite, config, fold, seeds in jobs(args.suite, args.seeds):
            if args.configs and config not in args.configs:
                continue
            if run_configuration(suite, config, fold, seeds) is not None:
                update_section("ablation", report(collect(), args.seeds))
    update_section("ablation", report(collect(), args.seeds))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
