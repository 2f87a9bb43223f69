"""Training throughput benchmarks for fer (images/second, CPU or CUDA).

1. Engine vs hand-written loop: fer's `Engine._train_epoch` (without and with the ProgressBar
   callback) against a plain PyTorch loop over the *same* built model, DataLoader, batch size
   and precision. The goal is engine/hand >= 0.97.
2. fp32 vs `precision = "auto"` (resnet50 at 224x224 by default, on CPU by default), with
   channels_last on and off for auto; measured with the hand-written loop. The goal is a
   speed-up >= 2.5x on a CPU with native bf16.

Everything is built once through fer's own path (recipe dict -> `validate` -> `build_all`), based
on recipes/quickstart.toml with overrides. Every timed run starts from a deep copy of the built
model and a fresh optimizer, does one untimed warm-up step, then times a fixed number of
batches; variants alternate within a round (and the order reverses every other round) to cancel
drift; the median over rounds is reported.

    .venv/bin/python bench/engine_overhead.py                  # defaults: resnet18 @112, resnet50 @224
    .venv/bin/python bench/engine_overhead.py --help
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import copy
import datetime as dt
import json
import math
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import Subset

from fer_core.api import (Built, Engine, EngineConfig, EpochSeededLoader, Precision, ProgressBar, Recipe, RunInfo,
                          apply_overrides, atomic_write_json, build_all, cpu_has_native_bf16, get_registry,
                          read_toml, resolve_precision, resolved, validate)

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data" / "fer2013"
BASE_RECIPE = REPO / "recipes" / "quickstart.toml"
NUM_CLASSES_HINT = 7  # FER2013; only used to size max_train_per_class

ENGINE_GOAL = 0.97
PRECISION_GOAL = 2.5

console = Console(stderr=True)  # progress lines; the final tables go to stdout
out_console = Console()


# ---------------------------------------------------------------- building


def recipe_overrides(model: str, input_size: int, batch_size: int, precision: str, device: str,
                     max_per_class: int) -> list[str]:
    """Overrides on top of recipes/quickstart.toml (recorded in the JSON for reproducibility)."""
    return [
        f"data.root={json.dumps(str(DATA_ROOT))}",
        "data.cache_images=true",
        f"data.max_train_per_class={max_per_class}",
        f"model.backbone.name={json.dumps(model)}",
        "model.backbone.pretrained=false",
        "model.backbone.in_chans=3",
        f"model.backbone.input_size={input_size}",
        f"train.batch_size={batch_size}",
        f"train.precision={json.dumps(precision)}",
        f"train.device={json.dumps(device)}",
        "train.channels_last=\"auto\"",
        "train.epochs=1",
        "tracking.enabled=false",
    ]


@dataclass
class Setup:
    recipe: Recipe
    built: Built
    overrides: list[str]
    warm_loader: EpochSeededLoader  # exactly one batch
    timed_loader: EpochSeededLoader  # exactly `batches` batches
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]


def build_setup(model: str, input_size: int, batch_size: int, precision: str, device: str, batches: int,
                seed: int = 0) -> Setup:
    """Build once via fer's path; derive a 1-batch warm-up loader and an N-batch timed loader."""
    needed = (batches + 1) * batch_size
    cap = math.ceil(needed / NUM_CLASSES_HINT * 1.25) + 1  # per-class cap: small classes hold fewer
    while True:
        overrides = recipe_overrides(model, input_size, batch_size, precision, device, cap)
        raw = apply_overrides(read_toml(BASE_RECIPE), overrides)
        # no LR schedule and no sampler: both loops then do exactly the same work over the same batches
        raw.pop("schedule", None)
        raw.pop("sampler", None)
        recipe = validate(raw, f"{BASE_RECIPE} (+ bench overrides)")
        if recipe.loss.plugin != "cross_entropy" or recipe.batch_transforms:
            raise SystemExit(f"{BASE_RECIPE}: the hand-written loop mirrors plain cross-entropy without batch "
                             f"transforms; the recipe has loss '{recipe.loss.plugin}' and "
                             f"{len(recipe.batch_transforms)} batch transform(s)")
        built = build_all(recipe, get_registry(recipe.plugins.disable))
        n_train = len(built.train_loader.dataset)
        if n_train >= needed or cap == 0:
            break
        cap = 0 if cap * 2 > 100_000 else cap * 2  # a rare class ran short: take more per class
    if n_train < needed:
        raise SystemExit(f"only {n_train} training images; need {needed} for {batches}+1 batches of {batch_size}")

    base = built.train_loader  # fer's loader: its dataset already holds the augmenter and the image cache
    order = list(range(n_train))
    random.Random(seed).shuffle(order)  # the capped list is grouped by class; mix before slicing

    def loader(indices: list[int]) -> EpochSeededLoader:
        return EpochSeededLoader(
            Subset(base.dataset, indices), batch_size=base.batch_size, shuffle=True,  # type: ignore[arg-type]
            num_workers=base.num_workers, pin_memory=base.pin_memory, seed=base.seed, drop_last=True,
            reseed=base.reseed,
        )

    reg = get_registry(recipe.plugins.disable)

    def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in m.parameters() if p.requires_grad]
        return reg.build("optimizer", recipe.optimizer.spec(), "optimizer", params)

    return Setup(recipe, built, overrides, loader(order[:batch_size]),
                 loader(order[batch_size:batch_size * (batches + 1)]), make_optimizer)


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_model(s: Setup) -> torch.nn.Module:
    return copy.deepcopy(s.built.model)  # built.model is never trained: every run starts identical


def hand_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: EpochSeededLoader, epoch: int,
               device: torch.device, precision: Precision, channels_last: bool,
               scaler: torch.amp.GradScaler | None) -> tuple[int, float]:
    """A plain PyTorch training loop; returns (images, mean loss)."""
    model.train()
    seen = 0
    loss_sum = torch.zeros((), device=device)
    for batch in loader.epoch(epoch):
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        if precision.dtype is not None:
            with torch.autocast(device_type=device.type, dtype=precision.dtype):
                logits = model(images)["emotion"]
                loss = F.cross_entropy(logits.float(), labels)
        else:
            logits = model(images)["emotion"]
            loss = F.cross_entropy(logits, labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() * images.shape[0]  # no per-batch host sync
        seen += images.shape[0]
    return seen, float(loss_sum) / max(seen, 1)


def run_hand(s: Setup, epoch: int, precision: Precision, channels_last: bool) -> dict[str, Any]:
    device = s.built.device
    model = fresh_model(s).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = s.make_optimizer(model)
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
    hand_epoch(model, optimizer, s.warm_loader, 0, device, precision, channels_last, scaler)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    seen, loss = hand_epoch(model, optimizer, s.timed_loader, epoch, device, precision, channels_last, scaler)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"images": seen, "seconds": seconds, "img_s": seen / seconds, "loss": loss}


def run_engine(s: Setup, epoch: int, progress_bar: bool, out_dir: Path, rounds: int = 1) -> dict[str, Any]:
    b = s.built
    t = s.recipe.train
    model = fresh_model(s)
    optimizer = s.make_optimizer(model)  # Engine moves the model; AdamW state is created lazily
    run = RunInfo(out_dir=out_dir, recipe=resolved(s.recipe), classes=list(b.splits.classes))
    callbacks = [ProgressBar(max(rounds, epoch))] if progress_bar else []  # the bar shows "epoch <round>/<rounds>"
    engine = Engine(
        model=model, loss=b.loss, optimizer=optimizer, scheduler=None, train_loader=s.warm_loader,
        val_loader=b.val_loader, device=b.device, precision=b.precision,
        config=EngineConfig(epochs=t.epochs, accumulate_steps=t.accumulate_steps, clip_grad_norm=t.clip_grad_norm,
                            monitor=t.monitor, monitor_mode=t.monitor_mode, channels_last=b.channels_last,
                            compile=t.compile, seed=t.seed),
        run=run, au_names=b.splits.au_names, callbacks=callbacks, batch_transforms=b.batch_transforms,
    )
    for cb in engine.callbacks:  # _train_epoch only emits per-epoch/per-batch hooks; fit() opens the bar
        cb.on_fit_start(run)
    try:
        engine._train_epoch(0)  # warm-up: one batch through the engine itself
        engine.train_loader = s.timed_loader
        sync(b.device)
        t0 = time.perf_counter()
        logs = engine._train_epoch(epoch)
        sync(b.device)
        seconds = time.perf_counter() - t0
    finally:
        for cb in engine.callbacks:
            cb.on_fit_end(run, {})
    seen = len(s.timed_loader) * s.timed_loader.batch_size
    return {"images": seen, "seconds": seconds, "img_s": seen / seconds, "loss": logs["train_loss"],
            "engine_reported_img_s": logs["img_per_s"]}


def interleaved(names: list[str], rounds: int, fn: Callable[[str, int], dict[str, Any]], label: str) -> dict[str, list[dict[str, Any]]]:
    """Each round runs every variant once; odd rounds run them in reverse order (ABC, CBA, ...).

    One untimed run of the first variant comes first, so that process start-up costs (thread
    pool, allocator, kernel selection) do not land on whichever variant happens to run first.
    """
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    res = fn(names[0], 0)
    console.print(f"[dim]{label}[/] process warm-up (untimed): {names[0]} {res['img_s']:.1f} img/s")
    total, k = rounds * len(names), 0
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            k += 1
            res = fn(name, r + 1)
            out[name].append(res)
            console.print(f"[dim]{label}[/] run {k}/{total} round {r + 1}: [bold]{name}[/] "
                          f"{res['img_s']:.1f} img/s ({res['images']} images, {res['seconds']:.2f} s, loss {res['loss']:.3f})")
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    v = [r["img_s"] for r in runs]
    return {"median_img_s": statistics.median(v), "min_img_s": min(v), "max_img_s": max(v), "runs": runs}


# ---------------------------------------------------------------- benchmarks


def bench_engine(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    console.rule(f"engine vs hand loop: {args.model} @{args.input_size}, batch {args.batch_size}, {args.batches} batches")
    s = build_setup(args.model, args.input_size, args.batch_size, args.precision, args.device, args.batches)
    b = s.built
    console.print(f"device {b.device}, precision {b.precision.name} ({b.precision.reason}), "
                  f"channels_last {b.channels_last}, {len(s.timed_loader) * args.batch_size} timed images per run")
    variants = {
        "engine": lambda ep: run_engine(s, ep, False, tmp),
        "hand": lambda ep: run_hand(s, ep, b.precision, b.channels_last),
        "engine+progressbar": lambda ep: run_engine(s, ep, True, tmp, args.rounds),
    }
    # every variant of a round sees the same epoch, hence the same batches in the same order
    runs = interleaved(list(variants), args.rounds, lambda name, r: variants[name](r), "engine")
    res = {name: summary(v) for name, v in runs.items()}
    hand = res["hand"]["median_img_s"]
    for name in ("engine", "engine+progressbar"):
        res[name]["ratio_vs_hand"] = res[name]["median_img_s"] / hand
        res[name]["meets_goal"] = res[name]["ratio_vs_hand"] >= ENGINE_GOAL
    return {
        "model": args.model, "input_size": args.input_size, "batch_size": args.batch_size, "batches": args.batches,
        "rounds": args.rounds, "device": str(b.device), "precision": b.precision.name,
        "precision_reason": b.precision.reason, "channels_last": b.channels_last,
        "num_workers": b.train_loader.num_workers, "recipe_base": str(BASE_RECIPE.relative_to(REPO)),
        "recipe_overrides": s.overrides + ["(schedule and sampler removed)"], "goal_ratio": ENGINE_GOAL, "variants": res,
    }


def bench_precision(args: argparse.Namespace) -> dict[str, Any]:
    console.rule(f"fp32 vs auto: {args.precision_model} @{args.precision_size}, batch {args.batch_size}, "
                 f"{args.precision_batches} batches, device {args.precision_device}")
    s = build_setup(args.precision_model, args.precision_size, args.batch_size, "auto", args.precision_device,
                    args.precision_batches)
    device = s.built.device
    auto = s.built.precision
    fp32 = resolve_precision("fp32", device)
    cl_default = s.built.channels_last  # what channels_last = "auto" resolves to for this model
    configs = {
        f"fp32 (channels_last {'on' if cl_default else 'off'})": (fp32, cl_default),
        f"auto={auto.name} channels_last on": (auto, True),
        f"auto={auto.name} channels_last off": (auto, False),
    }
    console.print(f"auto resolved to {auto.name} ({auto.reason}); channels_last auto -> {cl_default}; harness: hand-written loop")
    runs = interleaved(list(configs), args.rounds, lambda name, r: run_hand(s, r, *configs[name]), "precision")
    res = {}
    for name, v in runs.items():
        p, cl = configs[name]
        res[name] = {"precision": p.name, "channels_last": cl, **summary(v)}
    base = res[next(iter(configs))]["median_img_s"]
    for name in res:
        res[name]["speedup_vs_fp32"] = res[name]["median_img_s"] / base
    best_auto = max(res[n]["speedup_vs_fp32"] for n in list(res)[1:])
    return {
        "model": args.precision_model, "input_size": args.precision_size, "batch_size": args.batch_size,
        "batches": args.precision_batches, "rounds": args.rounds, "device": str(device), "harness": "hand-written loop",
        "auto_resolved": {"name": auto.name, "reason": auto.reason}, "channels_last_auto": cl_default,
        "recipe_base": str(BASE_RECIPE.relative_to(REPO)), "recipe_overrides": s.overrides + ["(schedule and sampler removed)"],
        "goal_speedup": PRECISION_GOAL, "best_auto_speedup": best_auto, "meets_goal": best_auto >= PRECISION_GOAL,
        "configs": res,
    }


# ---------------------------------------------------------------- reporting


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("model name", "hardware", "processor") and ":" in line:
                value = line.split(":", 1)[1].strip()
                if value and not value.isdigit():
                    return value
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
        "cpu_has_native_bf16": cpu_has_native_bf16(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_version": torch.version.cuda if cuda else None,
        "platform": platform.platform(),
    }


def print_tables(result: dict[str, Any]) -> None:
    m = result["machine"]
    out_console.print(f"[bold]machine[/]: {m['cpu_model']} ({m['cpu_capability']}, native bf16 {m['cpu_has_native_bf16']}), "
                      f"torch {m['torch']}, {m['torch_num_threads']} threads"
                      + (f", GPU {m['cuda_device']}" if m["cuda_device"] else ""))
    if e := result.get("engine"):
        t = Table(title=f"engine vs hand loop: {e['model']} @{e['input_size']}, batch {e['batch_size']}, "
                        f"{e['batches']} batches x {e['rounds']} rounds; {e['device']}, {e['precision']}, "
                        f"channels_last {e['channels_last']}")
        for col, j in (("variant", "left"), ("median img/s", "right"), ("min..max", "right"),
                       ("engine/hand", "right"), (f"goal >= {ENGINE_GOAL}", "center")):
            t.add_column(col, justify=j, no_wrap=col in ("variant", "config"))  # type: ignore[arg-type]
        for name, v in e["variants"].items():
            ratio = v.get("ratio_vs_hand")
            t.add_row(name, f"{v['median_img_s']:.1f}", f"{v['min_img_s']:.1f}..{v['max_img_s']:.1f}",
                      f"{ratio:.3f}" if ratio is not None else "-",
                      ("[green]yes[/]" if v["meets_goal"] else "[red]no[/]") if ratio is not None else "")
        out_console.print(t)
    if p := result.get("precision"):
        t = Table(title=f"fp32 vs auto ({p['harness']}): {p['model']} @{p['input_size']}, batch {p['batch_size']}, "
                        f"{p['batches']} batches x {p['rounds']} rounds; {p['device']}; auto -> "
                        f"{p['auto_resolved']['name']} ({p['auto_resolved']['reason']})")
        for col, j in (("config", "left"), ("median img/s", "right"), ("min..max", "right"), ("vs fp32", "right")):
            t.add_column(col, justify=j, no_wrap=col in ("variant", "config"))  # type: ignore[arg-type]
        for name, v in p["configs"].items():
            t.add_row(name, f"{v['median_img_s']:.2f}", f"{v['min_img_s']:.2f}..{v['max_img_s']:.2f}",
                      f"{v['speedup_vs_fp32']:.2f}x")
        out_console.print(t)
        verdict = "[green]meets[/]" if p["meets_goal"] else "[red]misses[/]"
        out_console.print(f"best auto speed-up {p['best_auto_speedup']:.2f}x: {verdict} the >= {PRECISION_GOAL}x goal"
                          + ("" if m["cpu_has_native_bf16"] or p["device"] != "cpu"
                             else " (this CPU has no native bf16: auto stays fp32, no speed-up expected)"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="timm model for the engine-vs-hand benchmark")
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32, help="used by both benchmarks")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per engine/hand run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="train.precision for the engine-vs-hand benchmark")
    ap.add_argument("--device", default="auto", help="train.device for the engine-vs-hand benchmark")
    ap.add_argument("--skip-engine", action="store_true", help="skip the engine-vs-hand benchmark")
    ap.add_argument("--skip-precision", action="store_true", help="skip the fp32-vs-auto benchmark")
    ap.add_argument("--precision-model", default="resnet50")
    ap.add_argument("--precision-size", type=int, default=224)
    ap.add_argument("--precision-batches", type=int, default=4)
    ap.add_argument("--precision-device", default="cpu", help="train.device for the fp32-vs-auto benchmark")
    ap.add_argument("--out", type=Path, default=Path("bench/out/engine_overhead.json"))
    args = ap.parse_args(argv)
    for name in ("batch_size", "batches", "rounds", "precision_batches", "input_size", "precision_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not DATA_ROOT.is_dir():
        raise SystemExit(f"FER2013 not found at {DATA_ROOT}")
    result: dict[str, Any] = {
        "benchmark": "engine_overhead",
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "cwd": os.getcwd(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "data_root": str(DATA_ROOT),
    }
    with tempfile.TemporaryDirectory(prefix="fer-bench-") as tmp:
        if not args.skip_engine:
            result["engine"] = bench_engine(args, Path(tmp))
        if not args.skip_precision:
            result["precision"] = bench_precision(args)
    result["machine"]["torch_num_threads"] = torch.get_num_threads()  # build_all may have set train.threads
    result["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    atomic_write_json(args.out, result)
    print_tables(result)
    out_console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
