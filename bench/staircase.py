"""The accuracy staircase (issue 12): the plan's phases as cumulative stages on FER2013; resumable.

Every stage is `recipes/staircase/fer2013_stage0.toml` plus the overrides of the stages below it
plus its own (STAGES), trained by `fer repeat` over its seeds into bench/out/staircase/<stage>
(not committed). Training selects on val (PublicTest) only; the test split is never read. A stage
with `tta` is also evaluated with `fer eval RUN --tta` (ten-crop: 4 corners + centre, mirrored)
per seed. When a seed finishes, its record — accuracy, macro-F1, per-class recall, minutes, device and
precision, ms/image and MB — goes to bench/results/staircase/<stage>/seed-N.json at once (with
`--commit` it is also committed at once: only committed files outlive a session's machine), and
the "staircase" section of docs/results.md is rewritten from every record. A seed with a record
is skipped; an interrupted one is resumed by the same `fer repeat` (from its last epoch) while
bench/out survives. Stages that later stages build on (`keep`) also commit their seeds' best
weights, packed as fp16 safetensors (`fer pack --half`), beside the record.

Budget (2-core CPU with native bf16, ~12 CPU-hours for everything, a single run ≤ 3 h):
`--plan` prints each stage's estimated minutes from the throughputs measured on this machine.

    .venv/bin/python bench/staircase.py --plan            # what would run, and for how long
    .venv/bin/python bench/staircase.py --commit          # every stage, in order, committing each seed
    .venv/bin/python bench/staircase.py --stage s1_data   # one stage (its parents must be decided)
    .venv/bin/python bench/staircase.py --breadth-first --stage s0_current --stage s2a_input64   # in this order
    .venv/bin/python bench/staircase.py --commit --breadth-first --deadline 09:45   # a session's share
    .venv/bin/python bench/staircase.py --report-only
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from fer_core.api import atomic_write_text  # noqa: E402
from machine import cpu_name, speed_isa  # noqa: E402
from results_doc import update_section  # noqa: E402

BASE = "recipes/staircase/fer2013_stage0.toml"
OUT = REPO / "bench" / "out" / "staircase"
RECORDS = REPO / "bench" / "results" / "staircase"

TEN_CROP = 'tta={ plugin = "standard", identity = false, crops = 5, crop_fraction = 0.9, hflip = true }'


@dataclass
class Stage:
    name: str
    parent: str | None  # the stage whose overrides this one adds to
    adds: str  # what it adds, in words (the table's second column)
    plan: str  # the plan's promise for this phase
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    tta: bool = False
    #: pack each seed's best weights (fp16) beside its record: later stages build on them
    keep: bool = False
    img_s: float = 329.0  # training images/s measured here at this model and input size (estimate)
    #: an ensemble stage trains nothing: it combines the packed seeds of these stages (`fer ensemble`)
    members: list[str] = field(default_factory=list)
    #: the seeds of a member that the ensemble combines, where not all of them (a member stage given
    #: more seeds after the ensemble was measured keeps the ensemble what its record says)
    member_seeds: dict[str, list[int]] = field(default_factory=dict)
    #: a distilled stage: the ensemble stage whose artifact teaches it (rebuilt from the committed
    #: packed members when bench/out was lost with a session)
    teacher: str | None = None
    #: a comparison the first readings showed is owed, run after the planned stages and counted
    #: outside the issue's ~12 CPU-hour plan (the table and the note say so)
    followup: bool = False


STAGES = [
    Stage("s0_current", None, "the plan's current status: ResNet-18 from scratch, 48 px, basic transforms, "
          "CE, StepLR, 30 epochs, no TTA", "< 60 %", seeds=[0, 1, 2]),
    Stage("s1_data", "s0_current", "augmentation for 48-px grey faces (faces48: scale jitter, flip, ±10°, "
          "random erasing) + Mixup/CutMix", "65–70 %",
          ['augment={ plugin = "albumentations", preset = "faces48" }',
           'batch_transforms=[{ plugin = "mix", mixup_alpha = 0.2, cutmix_alpha = 1.0, prob = 0.5, '
           'switch_prob = 0.5, off_last_epochs = 3 }]'], seeds=[0, 1]),
    Stage("s1b_balance", "s1_data", "+ class balance (effective-number weighted CE)", "(part of 65–70 %)",
          ['loss={ plugin = "weighted_cross_entropy", weights = "effective", beta = 0.999 }']),
    Stage("s2a_input64", "s1_data", "model level: input 64 px (more resolution after the stem)", "72–78 %",
          ["model.backbone.input_size=64"], img_s=287.0),
    Stage("s2b_mobilenetv2", "s1_data", "model level: ImageNet MobileNetV2 (../shared/weights) at 96 px",
          "72–78 %", ['model.backbone={ plugin = "torchvision", name = "mobilenet_v2", input_size = 96, '
                      'pretrained = "../shared/weights/mobilenet_v2-b0353104.pth" }',
                      'optimizer={ plugin = "adamw", lr = 0.001, weight_decay = 0.01 }',
                      'schedule={ plugin = "cosine", min_lr = 1e-5 }', "train.epochs=15"], keep=True, img_s=140.0),
    # parent s2a, decided after both ran: s2b is better on val (67.62 vs 59.49 %) but 50 epochs of
    # MobileNetV2 at 96 px are ~3.3 h per seed on the 2-core bf16 CPU, over a run's 3-hour budget
    Stage("s3_training", "s2a_input64", "training level: label smoothing 0.1, model EMA, plateau schedule, "
          "50 epochs, ten-crop TTA", "75–82 %",
          ['loss={ plugin = "label_smoothing", smoothing = 0.1 }', 'callbacks=[{ plugin = "ema", decay = 0.999 }]',
           'schedule={ plugin = "plateau", factor = 0.2, patience = 4 }', "train.epochs=50", TEN_CROP],
          seeds=[0, 1, 2], tta=True, keep=True, img_s=287.0),
]
#: the ensemble artifact a distilled stage's recipe names (built by the ensemble stage)
ENSEMBLE_DIR = "bench/out/staircase/s4_ensemble/ensemble"

# Stage 4, system level. Tuning is left out of the cumulative chain on purpose: issue 11 measured
# `fer tune` on short runs (tuned 58.65 ± 0.64 vs baseline 59.43 ± 0.60 %), and a search over
# 50-epoch runs is several times the whole budget; what a stated budget can buy is in bench/tuning.py.
STAGES += [
    Stage("s4_ensemble", "s3_training", "system level: ensemble of stage 3's seeds + s2b's MobileNetV2 "
          "(probabilities averaged, weights fitted on val NLL); no training", "78–85 %",
          members=["s3_training", "s2b_mobilenetv2"]),
    # the deploy student: the smallest network fast enough for one core (bench/deploy_candidates.py),
    # taught by the ensemble. The teacher is cached (one pass over the training images) and listed
    # before the mix, so Mixup/CutMix mix its targets too; its logits are not recomputed per batch.
    Stage("s4_student", "s1_data", "deploy student: MobileNetV3-Small 1.0 at 64 px distilled from the "
          "ensemble (T = 4, α = 0.7), faces48 + Mixup/CutMix, EMA, AdamW warmup-cosine, 40 epochs",
          "(shipped model)",
          ['model.backbone={ plugin = "timm", name = "mobilenetv3_small_100", pretrained = false, in_chans = 1, '
           'input_size = 64 }',
           'loss={ plugin = "distill", temperature = 4.0, alpha = 0.7, hard = { plugin = "label_smoothing", '
           'smoothing = 0.05 } }',
           f'batch_transforms=[{{ plugin = "teacher", run = "{ENSEMBLE_DIR}", cache = true }}, '
           '{ plugin = "mix", mixup_alpha = 0.2, cutmix_alpha = 1.0, prob = 0.5, switch_prob = 0.5, '
           'off_last_epochs = 3 }]',
           'callbacks=[{ plugin = "ema", decay = 0.999 }]',
           'optimizer={ plugin = "adamw", lr = 0.002, weight_decay = 0.01 }',
           'schedule={ plugin = "warmup_cosine", warmup_epochs = 2 }', "train.epochs=40"],
          seeds=[0], keep=True, teacher="s4_ensemble", img_s=300.0),
]
# follow-ups: comparisons the planned stages' readings showed are owed; last, so that they run after them
STAGES += [
    # the issue's "warmup-cosine vs a plateau schedule": stage 3's plateau never fired in seeds 0 and 1
    # (LR 0.01 for all 50 epochs, best epochs 50 and 46), so stage 3 measured no schedule at all
    Stage("s3b_cosine", "s3_training", "stage 3 with warmup-cosine (2 warmup epochs, to 0) instead of the "
          "plateau schedule", "follow-up, outside the ~12 CPU-h plan",
          ['schedule={ plugin = "warmup_cosine", warmup_epochs = 2 }'], tta=True, img_s=287.0, followup=True),
    # the from-scratch MobileNetV3 student reached 57.40 %, below s2b's pretrained MobileNetV2 (67.62 %):
    # pretraining is worth more than distillation here, so the deploy student starts from ImageNet, at
    # 64 px (bench/deploy_candidates.py: 0.56 × ResNet-10t@48's onnxruntime time), s2b's optimiser
    Stage("s4b_student_mnv2", "s1_data", "deploy student: ImageNet MobileNetV2 at 64 px distilled from the "
          "ensemble (T = 4, α = 0.7), faces48 + Mixup/CutMix, EMA, AdamW cosine, 18 epochs",
          "follow-up, outside the ~12 CPU-h plan",
          ['model.backbone={ plugin = "torchvision", name = "mobilenet_v2", input_size = 64, '
           'pretrained = "../shared/weights/mobilenet_v2-b0353104.pth" }',
           'loss={ plugin = "distill", temperature = 4.0, alpha = 0.7, hard = { plugin = "label_smoothing", '
           'smoothing = 0.05 } }',
           f'batch_transforms=[{{ plugin = "teacher", run = "{ENSEMBLE_DIR}", cache = true }}, '
           '{ plugin = "mix", mixup_alpha = 0.2, cutmix_alpha = 1.0, prob = 0.5, switch_prob = 0.5, '
           'off_last_epochs = 3 }]',
           'callbacks=[{ plugin = "ema", decay = 0.999 }]',
           'optimizer={ plugin = "adamw", lr = 0.001, weight_decay = 0.01 }',
           'schedule={ plugin = "cosine", min_lr = 1e-5 }', "train.epochs=18"],
          keep=True, teacher="s4_ensemble", img_s=250.0, followup=True),
]
STAGES += [
    # stage 3's training techniques were measured on ResNet-18@64 (s2a) because 50 epochs of s2b are
    # ~3.3 h here; they are owed on the best stage-2 network: s2b's recipe (AdamW, cosine) plus label
    # smoothing, EMA and ten-crop TTA, 25 epochs instead of 15 (s2b was still rising at 15)
    Stage("s3c_mnv2_training", "s2b_mobilenetv2", "stage 3's training level on s2b's MobileNetV2@96: label "
          "smoothing 0.1, model EMA, 25 epochs (cosine), ten-crop TTA", "follow-up, outside the ~12 CPU-h plan",
          ['loss={ plugin = "label_smoothing", smoothing = 0.1 }', 'callbacks=[{ plugin = "ema", decay = 0.999 }]',
           "train.epochs=25", TEN_CROP], seeds=[0, 1], tta=True, keep=True, img_s=140.0, followup=True),
]
STAGES += [
    # stage 4 again once the MobileNetV2 had stage 3's training: does a stronger, different member lift the
    # ensemble (s4_ensemble: +0.50 over its best member, three seeds of one recipe being too alike)?
    Stage("s4c_ensemble", "s4_ensemble", "s4_ensemble + s3c's MobileNetV2 as a fifth member (weights fitted on "
          "val NLL); no training", "follow-up, outside the ~12 CPU-h plan",
          members=["s3_training", "s2b_mobilenetv2", "s3c_mnv2_training"],
          member_seeds={"s3c_mnv2_training": [0]}, followup=True),
]
STAGES += [
    # s3c's best epochs were its last (25 and 24 of 25; +0.08 in the last): is it still short of training?
    # The same recipe with only the length changed (the cosine stretches with it), seed 0 first, paired
    # with s3c's seed 0; 96 min here (seed 0), so a seed fits a session beside nothing else
    Stage("s3d_mnv2_40ep", "s3c_mnv2_training", "s3c trained 40 epochs instead of 25 (cosine over all 40)",
          "follow-up, outside the ~12 CPU-h plan", ["train.epochs=40"], seeds=[0, 1], tta=True, keep=True,
          img_s=190.0, followup=True),
]
STAGES += [
    # s4c again with s3d, the best single model, as a sixth member: does the stronger member lift it?
    Stage("s4d_ensemble", "s4c_ensemble", "s4c_ensemble + s3d's MobileNetV2 (40 epochs) as a sixth member "
          "(weights fitted on val NLL); no training", "follow-up, outside the ~12 CPU-h plan",
          members=["s3_training", "s2b_mobilenetv2", "s3c_mnv2_training", "s3d_mnv2_40ep"],
          member_seeds={"s3c_mnv2_training": [0], "s3d_mnv2_40ep": [0]}, followup=True),
]
STAGES += [
    # the stage-3 "distillation from a stronger teacher", on the deploy network: s3d's recipe
    # unchanged (MobileNetV2@96, 40 cosine epochs, LS 0.1 as the hard part, EMA, Mixup/CutMix) taught by s4d's
    # six-member ensemble (+0.39 over s3d on val), paired with s3d's seed 0. s4b showed a pretrained
    # MobileNetV2 learns from a cached ensemble, but at 64 px and 18 epochs it has no undistilled twin;
    # this one has. The teacher is cached on the clean view and listed before the mix (see s4_student).
    Stage("s4e_student_s3d", "s3d_mnv2_40ep", "s3d distilled from s4d's ensemble (T = 4, α = 0.7, the hard "
          "part s3d's label smoothing 0.1)", "follow-up, outside the ~12 CPU-h plan",
          ['loss={ plugin = "distill", temperature = 4.0, alpha = 0.7, hard = { plugin = "label_smoothing", '
           'smoothing = 0.1 } }',
           'batch_transforms=[{ plugin = "teacher", run = "bench/out/staircase/s4d_ensemble/ensemble", '
           'cache = true }, { plugin = "mix", mixup_alpha = 0.2, cutmix_alpha = 1.0, prob = 0.5, '
           'switch_prob = 0.5, off_last_epochs = 3 }]'],
          tta=True, keep=True, teacher="s4d_ensemble", img_s=190.0, followup=True),
]
STAGES += [
    # issue 13's "beats the `fer` package on BOTH accuracy and ms per face": s3d (69.3 %) takes 0.72 ms
    # per face, mini-Xception 0.26 ms, and every from-scratch student stayed below it on accuracy
    # (s4_student 57.4 %). s3d's recipe at FER2013's native 48 px keeps the ImageNet start and cuts the
    # FLOPs 4× (bench/deploy_candidates.py times mobilenetv2_100@48); the question is what the
    # resolution costs in accuracy, paired with s3d's seed 0
    Stage("s3e_mnv2_48", "s3d_mnv2_40ep", "s3d at 48 px (FER2013's own size, no upsampling): the fast deploy "
          "candidate", "follow-up, outside the ~12 CPU-h plan",
          ['model.backbone={ plugin = "torchvision", name = "mobilenet_v2", input_size = 48, '
           'pretrained = "../shared/weights/mobilenet_v2-b0353104.pth" }'],
          tta=True, keep=True, img_s=400.0, followup=True),
]
BY_NAME = {s.name: s for s in STAGES}
TRAIN_IMAGES = 28_709


def overrides(stage: Stage) -> list[str]:
    chain = []
    s: Stage | None = stage
    while s is not None:
        chain.append(s)
        s = BY_NAME[s.parent] if s.parent else None
    # the description travels into every packed recipe.toml (a shipped model's card reads it), so it names
    # this stage, not stage 0's recipe file; both keys are ones a resumed run may change (fer_core.runner)
    about = f"FER2013, staircase stage {stage.name}: {stage.adds}"
    return [o for s in reversed(chain) for o in s.overrides] + [f"name={json.dumps('staircase_' + stage.name)}",
                                                                 f"description={json.dumps(about)}"]


def epochs(stage: Stage) -> int:
    n = 30
    for o in overrides(stage):
        if o.startswith("train.epochs="):
            n = int(o.split("=", 1)[1])
    return n


def estimate_minutes(stage: Stage, img_s: float | None = None) -> float:
    """Per seed: training at ``img_s`` (default: the rate measured on the reference machine, a
    2-core CPU with AMX-BF16), plus ~8 % for validation each epoch. An ensemble trains nothing:
    a few minutes of evaluation."""
    if stage.members:
        return 5.0
    return epochs(stage) * TRAIN_IMAGES / (img_s or stage.img_s) / 60 * 1.08 + teacher_minutes(stage)


#: a teacher's ms/image when its ensemble has no record yet (s4d's six members measured 8.5)
TEACHER_MS_GUESS = 10.0


def teacher_minutes(stage: Stage) -> float:
    """A distilled stage first rebuilds its teacher (the record's minutes) and caches its logits over
    the training images once, at the ensemble's measured ms/image: s4e's 1 + 5.5 minutes here, which
    an estimate of training alone left out (it admitted a student that would end ~10 minutes late)."""
    if not stage.teacher:
        return 0.0
    rec = RECORDS / stage.teacher / "seed-0.json"
    r = json.loads(rec.read_text()) if rec.is_file() else {}
    return r.get("minutes", 5.0) + r.get("ms_per_image", TEACHER_MS_GUESS) * TRAIN_IMAGES / 60_000


def machine_img_s(stage: Stage, steps: int = 6, batch: int = 64) -> tuple[float, str]:
    """Training images/s of this stage on *this* machine: its network's forward + backward + SGD
    step on random batches (at the precision and memory format a run would choose) plus its
    augmentation, each timed here (`fer run` of stages 0, 1 and 3 on this AVX2 CPU: 67, 63 and 48
    img/s; this gives 69, 62 and 48). Machines here differ fivefold (AMX-BF16 vs AVX2-only fp32), so the
    reference figures alone would start runs that cannot finish in a session. An ensemble stage
    trains nothing."""
    if stage.members:
        return stage.img_s, "no training"
    import torch

    from fer_core.api import autocast, build_model, get_registry, load, resolve_device, resolve_precision

    args = repeat_args(stage, [0])
    recipe, raw = load(REPO / args[1], [args[i + 1] for i, a in enumerate(args) if a == "-o"])
    device = resolve_device("auto")
    precision = resolve_precision(recipe.train.precision, device)
    model = build_model(recipe, get_registry(), [str(i) for i in range(7)], []).to(device)
    model.to(memory_format=torch.channels_last)
    pre = model.backbone.preprocessing
    x = torch.randn(batch, pre.channels, *pre.input_size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for i in range(steps + 2):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(x)["emotion"].float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1000 / (steps * batch)
    return 1000 / (ms + augment_ms(recipe, pre)), f"{device.type} {precision.name}"


def augment_ms(recipe, pre, n: int = 200) -> float:
    """ms per image of the stage's training augmentation, in this process on 48×48 grey images like
    FER2013's: the loader runs it in the training process on a CPU, between the steps."""
    import numpy as np

    from fer_core.api import get_registry

    aug = get_registry().build("augmenter", recipe.augment.spec(), "augment", pre)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 48), dtype=np.uint8) for _ in range(n)]
    for im in images[:20]:
        aug(im)
    t0 = time.perf_counter()
    for im in images:
        aug(im)
    return (time.perf_counter() - t0) * 1000 / n


def repeat_args(stage: Stage, seeds: list[int] | None = None) -> list[str]:
    args = ["repeat", BASE, "--seeds", ",".join(map(str, stage.seeds if seeds is None else seeds)),
            "--out", str((OUT / stage.name).relative_to(REPO))]
    for o in overrides(stage):
        args += ["-o", o]
    return args


def fer(args: list[str], log: Path) -> int:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] fer {shlex.join(args)}", flush=True)
    with open(log, "a") as f:
        return subprocess.run([str(REPO / ".venv" / "bin" / "fer"), *args], cwd=REPO, env=env,
                              stdout=f, stderr=subprocess.STDOUT).returncode


def seed_record(stage: Stage, seed: int) -> Path:
    return RECORDS / stage.name / f"seed-{seed}.json"


def commit(paths: list[Path], message: str) -> None:
    """Commit just these files (`git commit --only`): a session's machine may stop at any time, and
    only what is committed survives it; other work in progress in the checkout is left alone."""
    rel = [str(p.relative_to(REPO)) for p in paths]
    for attempt in range(10):  # another git command may hold the index lock for a moment
        subprocess.run(["git", "add", "--", *rel], cwd=REPO, capture_output=True)
        subprocess.run(["git", "commit", "-q", "-m", message, "--only", "--", *rel], cwd=REPO, capture_output=True)
        left = subprocess.run(["git", "status", "--porcelain", "--", *rel], cwd=REPO, capture_output=True, text=True)
        if left.returncode == 0 and not left.stdout.strip():
            return
        time.sleep(3)
    print(f"  could not commit {', '.join(rel)}; commit them by hand", flush=True)


def run_seed(stage: Stage, seed: int, keep: bool, do_commit: bool) -> dict | None:
    """One seed of a stage: train (resumable within a session), evaluate (plain, and ten-crop when
    the stage has TTA), write its record at once; with ``keep``, also its best weights packed as
    fp16 safetensors beside the record, for the stages that build on trained models (ensemble,
    teacher, shipped model) in a later session."""
    record = seed_record(stage, seed)
    if record.is_file():
        return json.loads(record.read_text())
    if stage.members:
        return run_ensemble(stage, do_commit)
    out = OUT / stage.name
    log = out.with_suffix(".log")
    if stage.teacher and build_ensemble(BY_NAME[stage.teacher], log) is None:
        print(f"  {stage.name}: its teacher {stage.teacher} cannot be built yet (its members have not all run)",
              flush=True)
        return None
    t0 = time.time()
    args = repeat_args(stage, [seed])
    if fer(args, log) != 0:
        print(f"  {stage.name} seed {seed}: fer repeat failed; see {log}", flush=True)
        return None
    rep = json.loads((out / "repeat.json").read_text())
    r = next(x for x in rep["runs"] if x["seed"] == seed)
    run = out / r["dir"]
    m = json.loads((run / "metrics.json").read_text())
    status = json.loads((run / "run.json").read_text())
    rows = history_rows(run)  # read once: minutes and training rate both come from it
    evals = {}
    for kind, extra in [("plain", [])] + ([("tta", ["--tta"])] if stage.tta else []):  # ms/image; ten-crop
        path = run / f"eval_{kind}.json"
        if not path.is_file() and fer(["eval", str(run.relative_to(REPO)), *extra, "--json",
                                       str(path.relative_to(REPO))], log) != 0:
            return None
        evals[kind] = json.loads(path.read_text())
    row = {"seed": seed, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
           "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()},
           "best_epoch": m["best_epoch"], "epochs_run": m.get("epochs_run"), "precision": status.get("precision"),
           "device": status.get("device"), "cpu": cpu_name(), "started": status.get("started"), "ended": status.get("ended"),
           "mb": round((run / "best.pt").stat().st_size / 2**20, 1),
           "ms_per_image": evals["plain"]["inference"]["batched_ms_per_image"],
           "minutes": round(run_minutes(rows, status, t0), 1), "train_img_s": train_img_s(rows),
           "command": "fer " + shlex.join(args)}
    if "tta" in evals:
        t = evals["tta"]
        row |= {"tta_accuracy": t["accuracy"], "tta_macro_f1": t["macro_f1"],
                "tta_ms_per_image": t["inference"]["batched_ms_per_image"]}
    written = [record]
    if keep:
        packed = record.with_suffix("")  # RECORDS/<stage>/seed-N/
        if not packed.exists() and fer(["pack", str(run.relative_to(REPO)), "--out", str(packed.relative_to(REPO)),
                                        "--half"], log) != 0:
            return None
        row["packed"] = str(packed.relative_to(REPO))
        written += sorted(packed.iterdir())
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(row, indent=2) + "\n")
    if do_commit:
        update_section("staircase", report())
        commit([*written, REPO / "docs" / "results.md"],
               f"staircase: {stage.name} seed {seed}: val accuracy {100 * row['accuracy']:.2f} %")
    return row


def history_rows(run: Path) -> list[dict]:
    """The engine's per-epoch rows (history.json), or none for a run without it."""
    history = run / "history.json"
    return json.loads(history.read_text()) if history.is_file() else []


def train_img_s(rows: list[dict]) -> int | None:
    """Median training images/s over a run's epochs (``history_rows``). Minutes alone cannot compare two
    runs: machines with the same instruction set have differed 3× in speed (an AMX VM at 120 img/s, a
    Zen 5 at 350 for the same net), so the record keeps the rate beside the minutes."""
    rates = [r["img_per_s"] for r in rows if "img_per_s" in r]
    return round(statistics.median(rates)) if rates else None


def run_minutes(rows: list[dict], status: dict, t0: float) -> float:
    """Minutes a seed took: the sum of the engine's per-epoch wall time (``history_rows``: training +
    validation), which counts every epoch once however often the run was interrupted and resumed;
    for runs without it, the engine's span (run.json: started → ended — a resumed run's covers only
    its last part); else this call's."""
    from datetime import datetime

    if rows and all("epoch_wall_seconds" in r for r in rows):
        return sum(r["epoch_wall_seconds"] for r in rows) / 60
    try:
        span = datetime.fromisoformat(status["ended"]) - datetime.fromisoformat(status["started"])
        return span.total_seconds() / 60
    except (KeyError, TypeError, ValueError):
        return (time.time() - t0) / 60


def member_dirs(stage: Stage) -> list[Path] | None:
    """The packed seeds (committed, fp16) an ensemble stage combines; None while any is missing."""
    dirs = [seed_record(BY_NAME[m], k).with_suffix("") for m in stage.members
            for k in stage.member_seeds.get(m, BY_NAME[m].seeds)]
    return dirs if all((d / "model.safetensors").is_file() for d in dirs) else None


def ensemble_recipe(stage: Stage, members: list[Path]) -> str:
    """The `fer ensemble` recipe of an ensemble stage: the members' probabilities averaged with
    weights fitted on val (NLL), under the issue's 500 MB."""
    return "\n".join([
        f"name = {json.dumps('staircase_' + stage.name)}",
        "members = [" + ", ".join(json.dumps(str(d.relative_to(REPO))) for d in members) + "]",
        'fit_split = "val"', "max_size_mb = 500", "", "[combiner]", 'plugin = "average"', 'space = "probs"',
        'weights = "fit"', ""])


def ensemble_dir(stage: Stage) -> Path:
    """Where an ensemble stage's artifact is built: one per stage (s4_ensemble's is ENSEMBLE_DIR, the
    students' teacher), so that a later ensemble never overwrites the teacher a student names."""
    return OUT / stage.name / "ensemble"


def build_ensemble(stage: Stage, log: Path) -> Path | None:
    """The ensemble artifact of ``stage`` in bench/out (built again from the packed members when a
    new session lost it): a few minutes, no training."""
    out = ensemble_dir(stage)
    if (out / "ensemble.json").is_file():
        return out
    members = member_dirs(stage)
    if members is None:
        return None
    recipe = out.parent / "ensemble.toml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recipe, ensemble_recipe(stage, members))
    if out.exists():  # a cut-off earlier attempt
        import shutil
        shutil.rmtree(out)
    if fer(["ensemble", str(recipe.relative_to(REPO)), "--out", str(out.relative_to(REPO))], log) != 0:
        return None
    return out


def run_ensemble(stage: Stage, do_commit: bool) -> dict | None:
    out = OUT / stage.name
    log = out.with_suffix(".log")
    t0 = time.time()
    ens = build_ensemble(stage, log)
    if ens is None:
        print(f"  {stage.name}: not every member is packed yet ({', '.join(stage.members)})", flush=True)
        return None
    path = out / "eval_plain.json"
    if not path.is_file() and fer(["eval", str(ens.relative_to(REPO)), "--json", str(path.relative_to(REPO))],
                                  log) != 0:
        return None
    m = json.loads(path.read_text())
    members = member_dirs(stage) or []
    row = {"seed": 0, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
           "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()},
           "members": [str(d.relative_to(REPO)) for d in members], "cpu": cpu_name(),
           "mb": round(sum(f.stat().st_size for d in members for f in d.iterdir()) / 2**20, 1),
           "ms_per_image": m["inference"]["batched_ms_per_image"], "minutes": round((time.time() - t0) / 60, 1),
           "command": f"fer ensemble {out.relative_to(REPO)}/ensemble.toml --out {ens.relative_to(REPO)}"}
    record = seed_record(stage, 0)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(row, indent=2) + "\n")
    if do_commit:
        update_section("staircase", report())
        commit([record, REPO / "docs" / "results.md"],
               f"staircase: {stage.name}: val accuracy {100 * row['accuracy']:.2f} %")
    return row


def stage_record(stage: Stage) -> dict | None:
    """The records of a stage's seeds that have finished (the table reads these); None before any."""
    rows = [json.loads(seed_record(stage, s).read_text()) for s in stage.seeds if seed_record(stage, s).is_file()]
    if not rows:
        return None
    return {"stage": stage.name, "adds": stage.adds, "plan": stage.plan, "epochs": epochs(stage), "seeds": rows,
            "minutes_total": round(sum(r["minutes"] for r in rows), 1),
            "command": "fer " + shlex.join(repeat_args(stage))}


def expected_minutes(stage: Stage) -> float:
    """Minutes one more seed of this stage will take here: the mean of its seeds finished on this
    CPU when there are any, else the estimate at the rate measured on this machine."""
    done = [r["minutes"] for p in (RECORDS / stage.name).glob("seed-*.json")
            if (r := json.loads(p.read_text())).get("cpu") == cpu_name()]
    return statistics.mean(done) if done else estimate_minutes(stage, machine_img_s(stage)[0])


def schedule(stages: list[Stage], breadth_first: bool) -> list[tuple[Stage, int]]:
    """(stage, seed) in the order to run them. Breadth first runs every stage's first seed before
    any stage's second, so a session that ends early leaves one reading of every stage rather than
    three of the first; follow-ups come after every planned stage, the system level included."""
    if not breadth_first:
        return [(s, k) for s in stages for k in s.seeds]
    # need every seed of other stages, or come after the plan: last, in the order given
    later = [s for s in stages if (s.members or s.teacher) and not s.followup] + [s for s in stages if s.followup]
    alone = [s for s in stages if s not in later]
    rounds = max((len(s.seeds) for s in alone), default=0)
    return [(s, s.seeds[i]) for i in range(rounds) for s in alone if i < len(s.seeds)] + \
        [(s, k) for s in later for k in s.seeds]


def parse_deadline(text: str) -> float:
    """'HH:MM' today (local time) → epoch seconds; a time already past means tomorrow."""
    h, m = (int(x) for x in text.split(":"))
    now = time.localtime()
    t = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, h, m, 0, 0, 0, -1))
    return t if t > time.time() else t + 86400


def _ms(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def report() -> str:
    lines = ["## The accuracy staircase (FER2013 val)", "",
             "Produced by `bench/staircase.py` (resumable); records in `bench/results/staircase/`, each with",
             "its exact command. Cumulative stages over `recipes/staircase/fer2013_stage0.toml`; mean ± sample",
             "std over seeds (n = seeds run); Δ against the parent stage. The test split is never used.", "",
             "| stage | what it adds | plan's promise | n | accuracy | macro-F1 | Δ acc | with TTA | min/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    recs = {s.name: r for s in STAGES if (r := stage_record(s)) is not None}
    for s in STAGES:
        r = recs.get(s.name)
        if r is None:
            done = sum(seed_record(s, k).is_file() for k in s.seeds)
            lines.append(f"| {s.name} | {s.adds} | {s.plan} | {done}/{len(s.seeds)} seeds | not finished | | | | "
                         f"~{estimate_minutes(s):.0f} (est.¹) |")
            continue
        acc = [x["accuracy"] for x in r["seeds"]]
        f1 = [x["macro_f1"] for x in r["seeds"]]
        parent = recs.get(s.parent or "")
        delta = (f"{100 * (statistics.mean(acc) - statistics.mean(x['accuracy'] for x in parent['seeds'])):+.2f}"
                 if parent else "")
        tta = _ms([x["tta_accuracy"] for x in r["seeds"] if "tta_accuracy" in x])
        n = f"{len(acc)}" if len(acc) == len(s.seeds) else f"{len(acc)} of {len(s.seeds)}"
        # the machines differ fivefold in speed: minutes say which instruction set they were run with
        isas = sorted({speed_isa(x.get("cpu", "")) or "?" for x in r["seeds"]})
        rates = [x["train_img_s"] for x in r["seeds"] if x.get("train_img_s")]
        rate = f", {statistics.median(rates):.0f} img/s" if rates else ""
        lines.append(f"| {s.name} | {s.adds} | {s.plan} | {n} | {_ms(acc)} | {_ms(f1)} | {delta} | {tta} | "
                     f"{r['minutes_total'] / max(len(acc), 1):.0f} ({', '.join(isas)}{rate}) |")
    lines += ["", "n: seeds finished (\"1 of 3\": the stage's other seeds are still to run). min/run: wall minutes of",
              "training + validation per seed, with the CPU's instruction set (avx2: fp32, about 5× slower than",
              "the bf16 machines) and, where recorded, the median training rate (machines with the same",
              "instruction set differ up to 3×). ¹ estimated for the reference machine (2 cores with AMX-BF16, bf16);",
              "`bench/staircase.py --plan` measures the machine it runs on."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=list(BY_NAME), action="append",
                    help="run only this stage (repeat it for several: they run in the order given)")
    ap.add_argument("--plan", action="store_true", help="print the stages and their estimated minutes")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--commit", action="store_true",
                    help="git-commit each seed's record (and packed weights) the moment it is written")
    ap.add_argument("--breadth-first", action="store_true",
                    help="run every stage's first seed, then every stage's second, ...")
    ap.add_argument("--deadline", metavar="HH:MM",
                    help="start no seed expected to end after this local time (a session's end: a run cut "
                         "off loses its bench/out)")
    args = ap.parse_args()
    if args.plan:
        total = here = 0.0
        print(f"this machine: {cpu_name()}; 'here' = measured now (network steps + augmentation cost)")
        for s in STAGES:
            m = estimate_minutes(s) * len(s.seeds)
            img_s, how = machine_img_s(s)
            h = estimate_minutes(s, img_s) * len(s.seeds)
            if not s.followup:
                total, here = total + m, here + h
            what = f"{len(s.members)} stages' seeds combined" if s.members else \
                f"{len(s.seeds)} seed(s) × {epochs(s)} epochs"
            print(f"{s.name:18} {what} ≈ {m / 60:.1f} h on the reference "
                  f"machine, {h / 60:.1f} h here ({img_s:.0f} img/s, {how})   {s.adds}", flush=True)
        print(f"total ≈ {total / 60:.1f} CPU-hours on the reference machine (AMX-BF16, 2 threads), "
              f"{here / 60:.1f} h here, follow-ups not counted")
        return
    if not args.report_only:
        deadline = parse_deadline(args.deadline) if args.deadline else None
        failed: set[str] = set()
        for s, seed in schedule([BY_NAME[n] for n in args.stage] if args.stage else STAGES, args.breadth_first):
            if seed_record(s, seed).is_file() or s.name in failed:
                continue
            if deadline is not None and time.time() + 60 * (need := expected_minutes(s)) > deadline:
                print(f"  {s.name} seed {seed}: ~{need:.0f} min would end after {args.deadline}; not started",
                      flush=True)
                continue
            if run_seed(s, seed, s.keep, args.commit) is None:
                failed.add(s.name)
            update_section("staircase", report())
    update_section("staircase", report())


if __name__ == "__main__":
    main()
