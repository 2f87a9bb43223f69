"""Issue 11's measurements of search and validation, on real faces; resumable.

1. `fer tune recipes/tune_quickstart.toml`: 24 trials with the median pruner, and without
   (`tune.pruner = "none"`) as many full trials as the same compute buys (17 ≈ the pruned study's
   trial-epochs): best validation macro-F1 / accuracy found for the same training time. The two
   studies share the sampler seed, so their 8 random start-up trials draw the same values, and
   those the pruned study cut short show what pruning threw away.
2. The tuned recipe (the best trial of both studies) against the baseline `recipes/quickstart.toml`,
   `fer repeat` over seeds 1, 2, 3 each: seed 0 trained the tuned trial itself and won the
   search on val, so it would flatter the tuned recipe.
3. `fer cv` on CK+, 5 subject-grouped folds: emotion-only vs multi-task (emotion + AUs).

Every step is a real `fer` command (subprocess) into bench/out/tuning/ (not committed); its
summary is copied to bench/results/tuning/ (committed) when it finishes, and while a study runs
its Optuna journal is copied there every minute. A step with a record is skipped; an interrupted
step is continued by the same command (`fer tune`, `fer repeat` and `fer cv` all resume), so
starting the script again carries on. After every step the "tuning" section of docs/results.md is
rewritten from the records.

    .venv/bin/python bench/tuning.py                 # everything, in the order above
    .venv/bin/python bench/tuning.py --threads 1     # leave a core free (the figures do not change)
    .venv/bin/python bench/tuning.py --only study-unpruned --threads 1 &   # a step in its own process
    .venv/bin/python bench/tuning.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from fer_core.api import atomic_write_text  # noqa: E402
from results_doc import update_section  # noqa: E402

OUT = REPO / "bench" / "out" / "tuning"
RECORDS = REPO / "bench" / "results" / "tuning"
TRIALS = 24
#: the unpruned study stops at the pruned study's compute (≈ 85 trial-epochs = 17 full trials): the
#: question is what each finds for the same training time; 24 full trials would take 7 h here
TRIALS_OF = {"pruned": TRIALS, "unpruned": 17}
TUNE = "recipes/tune_quickstart.toml"
BASELINE = "recipes/quickstart.toml"
SEEDS = "1,2,3"
NO_TRACKING = "tracking.enabled=false"  # one sqlite store per step would only cost time here
STUDIES = {"pruned": [], "unpruned": ['tune.pruner="none"']}
CK = "recipes/ckplus_multitask.toml"
CK_CONFIGS = {
    "emotion_only": ['model.heads={ emotion = { plugin = "linear", dropout = 0.2 } }',
                     'loss={ plugin = "cross_entropy" }'],
    "multitask": [],
}
JOURNAL = "study.journal"


def fer(args: list[str], log: Path, threads: int | None) -> int:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    if threads:
        args = [*args, "-o", f"train.threads={threads}"]
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] fer {shlex.join(args)}", flush=True)
    with open(log, "a") as f:
        return subprocess.run([str(REPO / ".venv" / "bin" / "fer"), *args], cwd=REPO, env=env,
                              stdout=f, stderr=subprocess.STDOUT).returncode


def _copy_journal(study_dir: Path, name: str, stop: threading.Event) -> None:
    src, dst = study_dir / JOURNAL, RECORDS / f"study-{name}.journal"
    while not stop.wait(60):
        if src.is_file():
            shutil.copyfile(src, dst)


def tune_args(name: str) -> list[str]:
    args = ["tune", TUNE, "--trials", str(TRIALS_OF[name]), "--study-dir", str((OUT / f"study-{name}").relative_to(REPO)),
            "-o", NO_TRACKING]
    for o in STUDIES[name]:
        args += ["-o", o]
    return args


def run_study(name: str, threads: int | None) -> None:
    record = RECORDS / f"study-{name}.json"
    if record.is_file():
        return
    study_dir = OUT / f"study-{name}"
    saved = RECORDS / f"study-{name}.journal"
    if not (study_dir / JOURNAL).is_file() and saved.is_file():  # bench/out lost: continue from the record
        study_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(saved, study_dir / JOURNAL)
    RECORDS.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    copier = threading.Thread(target=_copy_journal, args=(study_dir, name, stop), daemon=True)
    copier.start()
    t0 = time.time()
    rc = fer(tune_args(name), OUT / f"study-{name}.log", threads)
    stop.set()
    copier.join()
    if rc != 0:
        print(f"  fer tune exited {rc}; see {OUT / f'study-{name}.log'}", flush=True)
        return
    shutil.copyfile(study_dir / JOURNAL, saved)
    summary = json.loads((study_dir / "study.json").read_text())
    best = summary["best_trial"]
    mpath = study_dir / f"trial-{best:04d}" / "metrics.json"
    if mpath.is_file():
        metrics = json.loads(mpath.read_text())
        summary["best_metrics"] = {k: metrics[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "best_epoch")}
    else:  # trained by an earlier session whose bench/out was lost with its machine: only the journal survived
        summary["best_metrics"] = {"accuracy": None, "macro_f1": summary["best_value"], "balanced_accuracy": None,
                                   "best_epoch": None, "note": "trial directory lost; the journal holds its value only"}
    summary["seconds_this_session"] = round(time.time() - t0, 1)
    summary["command"] = "fer " + shlex.join(tune_args(name))
    shutil.copyfile(study_dir / "best.toml", RECORDS / f"best-{name}.toml")
    atomic_write_text(record, json.dumps(summary, indent=2) + "\n")


def tuned_recipe() -> Path | None:
    """The better best trial of the two studies (by the monitored metric)."""
    done = [json.loads((RECORDS / f"study-{n}.json").read_text()) | {"name": n}
            for n in STUDIES if (RECORDS / f"study-{n}.json").is_file()]
    if len(done) < len(STUDIES):
        return None
    best = max(done, key=lambda s: s["best_value"])
    return RECORDS / f"best-{best['name']}.toml"


def run_repeat(name: str, recipe: Path, threads: int | None) -> None:
    record = RECORDS / f"repeat-{name}.json"
    if record.is_file():
        return
    out = OUT / f"repeat-{name}"
    args = ["repeat", str(recipe.relative_to(REPO) if recipe.is_absolute() else recipe), "--seeds", SEEDS,
            "--out", str(out.relative_to(REPO)), "-o", NO_TRACKING]
    if fer(args, OUT / f"repeat-{name}.log", threads) == 0:
        rep = json.loads((out / "repeat.json").read_text()) | {"command": "fer " + shlex.join(args)}
        atomic_write_text(record, json.dumps(rep, indent=2) + "\n")


def run_cv(name: str, threads: int | None) -> None:
    record = RECORDS / f"cv-ckplus-{name}.json"
    if record.is_file():
        return
    out = OUT / f"cv-ckplus-{name}"
    args = ["cv", CK, "--folds", "5", "--group-by", "subject", "--out", str(out.relative_to(REPO)), "-o", NO_TRACKING]
    for o in CK_CONFIGS[name]:
        args += ["-o", o]
    if fer(args, OUT / f"cv-ckplus-{name}.log", threads) == 0:
        cv = json.loads((out / "cv.json").read_text()) | {"command": "fer " + shlex.join(args)}
        atomic_write_text(record, json.dumps(cv, indent=2) + "\n")


def _load(name: str) -> dict | None:
    p = RECORDS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def report() -> str:
    lines = ["## Hyperparameter search, seed repeats and cross-validation", "",
             "Produced by `bench/tuning.py` (resumable; rerun it to fill in what is missing). Records:",
             "`bench/results/tuning/` (each with its exact command). Percentages on the validation split.", "",
             "### Search over the plan's §4.1 space, with and without pruning, for the same compute", "",
             f"`{TUNE}`: ResNet-10t from scratch on FER2013 48×48, 5 epochs per trial, TPE (seed 0, 8 random",
             "start-up trials), monitored metric validation macro-F1. Pruned = Optuna's median pruner",
             "(after 4 finished trials, never on the first epoch), 24 trials; unpruned = every trial runs its 5",
             f"epochs, {TRIALS_OF['unpruned']} trials (about the pruned study's compute). Trial-epochs = epochs",
             "actually trained, summed over the study. Failed = trials cut off when a session's machine",
             "stopped (`fer tune` marks them failed on resume and samples a new trial; their epochs count).",
             "Wall minutes are summed trial durations at one thread per study, two studies side by side.", "",
             "| study | trials (complete / pruned / failed) | best macro-F1 | its accuracy | trial-epochs | wall min |",
             "|---|---|---|---|---|---|"]
    studies = {n: _load(f"study-{n}") for n in STUDIES}
    for n, s in studies.items():
        if s is None:
            lines.append(f"| {n} | not run yet | | | | |")
            continue
        states = [t["state"] for t in s["trials"]]
        epochs = sum(t["epochs_run"] or 0 for t in s["trials"])
        wall = sum(t["duration_s"] or 0 for t in s["trials"]) / 60
        lines.append(f"| {n} | {states.count('COMPLETE')} / {states.count('PRUNED')} / {states.count('FAIL')} | "
                     f"{pct(s['best_value'])} | {pct(s['best_metrics']['accuracy'])} | {epochs} | {wall:.0f} |")
    p, u = studies["pruned"], studies["unpruned"]
    if p and u:
        ep = lambda s: sum(t["epochs_run"] or 0 for t in s["trials"])  # noqa: E731
        gap = 100 * (p["best_value"] - u["best_value"])
        lines += ["", f"For {ep(p)} vs {ep(u)} trial-epochs the pruned study's best macro-F1 is {gap:+.2f} pt "
                  "against the unpruned one's: one study each, so a gap inside the ±1.3 pt seed-to-seed spread of "
                  "this recipe (docs/results.md, ablation) is not evidence either way.",
                  "", f"The issue's goal (within 0.5 pt of an unpruned 24-trial study's best, with ≤ 50 % of its "
                  f"{5 * TRIALS} trial-epochs): the pruned study used {ep(p)} = {100 * ep(p) / (5 * TRIALS):.0f} % of them, "
                  "so the compute half of the goal is not met. With 5 epochs per trial the median rule stops a trial "
                  "after epoch 2 at the earliest (it never prunes on the first epoch): even if all 20 trials after the "
                  "4 start-up ones were stopped there, the study would spend 4 × 5 + 20 × 2 = 60 trial-epochs, exactly "
                  "50 %. Pruning after epoch 1 would save more, but the table below shows that even at epoch 2 the "
                  "rule stops trials that end close to the best."]
        # the same parameters in both studies (the random start-up trials): what a pruned trial would have reached
        full = {json.dumps(t["params"], sort_keys=True): t for t in u["trials"] if t["state"] == "COMPLETE"}
        cut = [(t, full[k]) for t in p["trials"] if t["state"] == "PRUNED"
               and (k := json.dumps(t["params"], sort_keys=True)) in full]
        if cut:
            best_complete = max(t["value"] for t in p["trials"] if t["state"] == "COMPLETE")
            lines += ["", "Trials with the same parameters in both studies that the pruner stopped: their value when "
                      "pruned and what the unpruned study's copy reached after 5 epochs.", "",
                      "| trial | pruned after epoch | macro-F1 then | macro-F1 at epoch 5 | vs the pruned study's best |",
                      "|---|---|---|---|---|"]
            for t, f in cut:
                lines.append(f"| {t['number']} | {t['epochs_run']} | {pct(t['value'])} | {pct(f['value'])} | "
                             f"{100 * (f['value'] - best_complete):+.2f} pt |")
    lines += ["", "Commands: " + "; ".join(f"`{shlex.join(['fer', *tune_args(n)])}`" for n in STUDIES), ""]

    lines += ["### Tuned vs baseline, fresh seeds", "",
              f"The best trial's recipe (`bench/results/tuning/best-*.toml`) and `{BASELINE}`, `fer repeat --seeds {SEEDS}`",
              "each (seed 0 is left out: it trained the winning trial, which was picked on this same val split).", "",
              "| recipe | seeds | accuracy | macro-F1 |", "|---|---|---|---|"]
    reps = {n: _load(f"repeat-{n}") for n in ("baseline", "tuned")}
    for n, r in reps.items():
        if r is None:
            lines.append(f"| {n} | not run yet | | |")
        else:
            lines.append(f"| {n} | {','.join(map(str, r['seeds']))} | {pct(r['mean']['accuracy'], r['std']['accuracy'])} | "
                         f"{pct(r['mean']['macro_f1'], r['std']['macro_f1'])} |")
    if all(reps.values()):
        d = {k: 100 * (reps["tuned"]["mean"][k] - reps["baseline"]["mean"][k]) for k in ("accuracy", "macro_f1")}
        lines += ["", f"Δ tuned − baseline: accuracy {d['accuracy']:+.2f} pt, macro-F1 {d['macro_f1']:+.2f} pt "
                  "(the plan promised +3–5 %)."]
        best = max((s for s in studies.values() if s), key=lambda s: s["best_value"], default=None)
        if best and d["macro_f1"] < 1.0:
            lines += ["", f"Reading: the promised gain is not there. The winning trial's {pct(best['best_value'])} "
                      "macro-F1 is the maximum of many single-seed scores on the same val split, so it carries "
                      "the luck of its seed (winner's curse); on fresh seeds the tuned recipe scores "
                      f"{pct(reps['tuned']['mean']['macro_f1'])}. And a 5-epoch trial is a regime where regularisers "
                      "cannot pay off, while the search space (the plan's §4.1) always keeps Mixup on every batch "
                      "and label smoothing — only their strengths are searched — which the baseline has none of. "
                      "Tuning is judged again where it can help, on the staircase's long runs (issue 12, stage 4)."]
    lines += ["", "### CK+: emotion-only vs multi-task, 5 subject-grouped folds", "",
              f"`fer cv {CK} --folds 5 --group-by subject` (train and val pooled, test untouched), the emotion-only",
              "variant with the overrides in its record. Mean ± sample std over folds; out-of-fold = one",
              "metric over every pooled image's prediction from the fold that held it out.", "",
              "| variant | accuracy | macro-F1 | out-of-fold accuracy | out-of-fold macro-F1 |", "|---|---|---|---|---|"]
    for n in CK_CONFIGS:
        c = _load(f"cv-ckplus-{n}")
        if c is None:
            lines.append(f"| {n} | not run yet | | | |")
            continue
        oof = c.get("oof", {})
        lines.append(f"| {n} | {pct(c['mean']['accuracy'], c['std']['accuracy'])} | "
                     f"{pct(c['mean']['macro_f1'], c['std']['macro_f1'])} | {pct(oof.get('accuracy'))} | "
                     f"{pct(oof.get('macro_f1'))} |")
    cvs = {n: _load(f"cv-ckplus-{n}") for n in CK_CONFIGS}
    if all(cvs.values()):
        d = 100 * (cvs["multitask"]["mean"]["accuracy"] - cvs["emotion_only"]["mean"]["accuracy"])
        sd = 100 * max(c["std"]["accuracy"] for c in cvs.values())
        lines += ["", f"Reading: multi-task (emotion + 24 AU presence labels) minus emotion-only is {d:+.2f} pt of "
                  f"accuracy, against a fold-to-fold std of up to {sd:.2f} pt: on CK+ with this small network the AU "
                  "head neither helps nor hurts measurably. The plan's +4–7 % for multi-task learning (§2.2) is not "
                  "there on CK+, whose posed peak frames the emotion head alone already gets 90 % right; RAF-CE's "
                  "compound classes, where the plan expects it, are not on this machine."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per training (default: all cores)")
    ap.add_argument("--report-only", action="store_true")
    steps = {f"study-{n}": lambda n=n: run_study(n, args.threads) for n in STUDIES}
    steps["repeat-baseline"] = lambda: run_repeat("baseline", REPO / BASELINE, args.threads)
    steps["repeat-tuned"] = lambda: (r := tuned_recipe()) and run_repeat("tuned", r, args.threads)
    steps |= {f"cv-ckplus-{n}": lambda n=n: run_cv(n, args.threads) for n in CK_CONFIGS}
    ap.add_argument("--only", default=None, metavar="STEP[,STEP]",
                    help="run only these steps, in this order, e.g. two processes with one thread each on a "
                         "2-core machine: --only study-pruned,repeat-baseline and --only study-unpruned. "
                         "Steps: " + ", ".join(steps))
    args = ap.parse_args()
    chosen = list(steps) if args.only is None else [s.strip() for s in args.only.split(",")]
    if unknown := [s for s in chosen if s not in steps]:
        ap.error(f"unknown step {unknown[0]!r}; steps: {', '.join(steps)}")
    if not args.report_only:
        for name in chosen:
            steps[name]()
            update_section("tuning", report())
    update_section("tuning", report())


if __name__ == "__main__":
    main()
