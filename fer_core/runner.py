"""`fer run`, `fer run --resume`, `fer eval`: run directories around the engine."""

from __future__ import annotations

import datetime as dt
import json
import re
import traceback
from pathlib import Path
from typing import Any

from . import checkpoint, dist
from .build import build_all, build_model, build_source, build_splits, eval_loader
from .console import ProgressBar, console
from .data import check_images
from .engine import BEST, LAST, Engine, EngineConfig, metrics_from_predictions, predict
from .errors import FerError
from .hardware import resolve_device, resolve_precision
from .interfaces import Preprocessing, RunInfo, Sample
from .plots import confusion_matrix_png
from .recipe import Recipe, apply_overrides, dump_toml, read_toml, resolved, validate
from .registry import get_registry

RECIPE_FILE = "recipe.toml"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
STATUS_FILE = "run.json"


def default_out_dir(recipe: Recipe) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe.name).strip("-") or "run"
    return Path("runs") / f"{safe}-{stamp}"


def _write_status(out: Path, **fields: Any) -> None:
    if not dist.is_main():
        return
    path = out / STATUS_FILE
    status = json.loads(path.read_text()) if path.is_file() else {}
    status.update(fields)
    checkpoint.atomic_write_json(path, status)


def train(recipe_path: Path | None, overrides: list[str], out_dir: Path | None, resume_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    """Validate everything, then train; returns (run dir, final metrics)."""
    if resume_dir is not None:
        out = resume_dir
        rpath = out / RECIPE_FILE
        if not rpath.is_file():
            raise FerError(f"{out}: not a fer run directory (no {RECIPE_FILE})")
        raw = apply_overrides(read_toml(rpath), overrides)
        recipe = validate(raw, str(rpath))
    else:
        assert recipe_path is not None
        raw = apply_overrides(read_toml(recipe_path), overrides)
        recipe = validate(raw, str(recipe_path))
        out = out_dir or default_out_dir(recipe)
        if (out / LAST).exists():
            raise FerError(f"{out}: already holds a run; continue it with `fer run --resume {out}` or choose another --out")
    reg = get_registry(recipe.plugins.disable)
    built = build_all(recipe, reg)
    resolved_recipe = resolved(recipe)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(out / RECIPE_FILE, dump_toml(resolved_recipe))
    run = RunInfo(out_dir=out, recipe=resolved_recipe, classes=list(built.splits.classes),
                  resumed=resume_dir is not None, plugin_versions=reg.versions())
    t = recipe.train
    engine = Engine(
        model=built.model, loss=built.loss, optimizer=built.optimizer, scheduler=built.scheduler,
        train_loader=built.train_loader, val_loader=built.val_loader, device=built.device,
        precision=built.precision,
        config=EngineConfig(epochs=t.epochs, accumulate_steps=t.accumulate_steps, clip_grad_norm=t.clip_grad_norm,
                            monitor=t.monitor, monitor_mode=t.monitor_mode,
                            early_stopping_patience=t.early_stopping_patience,
                            channels_last=built.channels_last, compile=t.compile, seed=t.seed),
        run=run, au_names=built.splits.au_names,
        callbacks=[ProgressBar(t.epochs), *built.callbacks], batch_transforms=built.batch_transforms,
        finalize=lambda final: _write_results(out, recipe, final, engine.state.history),
    )
    if resume_dir is not None and (out / LAST).is_file():
        engine.restore(checkpoint.load(out / LAST, built.device))
        console.print(f"resuming {out} after epoch {engine.state.epoch}/{t.epochs}")
    console.print(
        f"[bold]{recipe.name}[/]: {len(built.splits.train)} train / {len(built.splits.val)} val images, "
        f"{len(built.splits.classes)} classes; device {built.device}, precision {built.precision.name} "
        f"({built.precision.reason}), channels_last {built.channels_last}; run dir {out}"
        + (f"; skipped {built.splits.skipped} unreadable image(s)" if built.splits.skipped else "")
    )
    _write_status(out, status="running", device=str(built.device), precision=built.precision.name,
                  precision_reason=built.precision.reason,
                  started=dt.datetime.now().isoformat(timespec="seconds"), skipped_images=built.splits.skipped)
    try:
        final = engine.fit()
    except BaseException as e:
        _write_status(out, status="failed", error=f"{type(e).__name__}: {e}",
                      ended=dt.datetime.now().isoformat(timespec="seconds"),
                      traceback=traceback.format_exc(limit=20) if not isinstance(e, FerError) else "")
        raise
    return out, final


def _write_results(out: Path, recipe: Recipe, final: dict[str, Any], history: list[dict[str, float]]) -> None:
    if not dist.is_main():
        return
    checkpoint.atomic_write_json(out / METRICS_FILE, {"split": recipe.data.val_split, **final})
    checkpoint.atomic_write_json(out / HISTORY_FILE, history)
    confusion_matrix_png(final["confusion_matrix"], final["classes"], out / "confusion_matrix.png",
                         title=f"{recipe.name}: validation, best epoch {final['best_epoch']}")
    _write_status(out, status="finished", ended=dt.datetime.now().isoformat(timespec="seconds"))


def _map_classes(samples: list[Sample], data_classes: list[str], ckpt_classes: list[str], where: str) -> list[Sample]:
    """Re-index labels into the checkpoint's class order, matching names case-insensitively."""
    index = {c.lower(): i for i, c in enumerate(ckpt_classes)}
    unknown = sorted({data_classes[s.label] for s in samples if data_classes[s.label].lower() not in index})
    if unknown:
        raise FerError(f"{where}: classes {unknown} are not among the model's classes {ckpt_classes}")
    return [Sample(s.path, index[data_classes[s.label].lower()], s.au) for s in samples]


def evaluate(run_dir: Path, split: str | None, overrides: list[str]) -> dict[str, Any]:
    rpath = run_dir / RECIPE_FILE
    if not rpath.is_file():
        raise FerError(f"{run_dir}: not a fer run directory (no {RECIPE_FILE})")
    recipe = validate(apply_overrides(read_toml(rpath), overrides), str(rpath))
    ckpt = checkpoint.load(run_dir / BEST)
    classes, au_names = list(ckpt["classes"]), list(ckpt.get("au_names", []))
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    reg = get_registry(recipe.plugins.disable)
    split = split or recipe.data.val_split
    source = build_source(recipe, reg)
    if split in source.splits and split != recipe.data.train_split:
        samples, _ = check_images(source.splits[split], recipe.data.skip_missing)
    elif split in (recipe.data.train_split, recipe.data.val_split) and recipe.data.train_split in source.splits:
        # the run's own training split, or the validation part it held out of it (same seed)
        splits = build_splits(recipe, reg, source=source)
        samples = splits.train if split == recipe.data.train_split else splits.val
    else:
        raise FerError(f"--split: split '{split}' not found; the dataset has: {', '.join(sorted(source.splits))}")
    samples = _map_classes(samples, source.classes, classes, f"data ({recipe.data.plugin})")
    if source.au_names != au_names:
        samples = [Sample(s.path, s.label, None) for s in samples]  # AU vocabularies differ: no AU metrics
    # weights come from the checkpoint: do not load pretrained files again
    backbone = recipe.model.backbone
    if "pretrained" in backbone.params():
        setattr(backbone, "pretrained", False)
    model = build_model(recipe, reg, classes, au_names, ckpt.get("task_sizes"))
    model.load_state_dict(ckpt["model"])
    device = resolve_device(recipe.train.device)
    precision = resolve_precision(recipe.train.precision, device)
    model.to(device)
    loader = eval_loader(samples, pre, len(au_names), recipe.train.eval_batch_size or 2 * recipe.train.batch_size,
                         0, False)
    pred = predict(model, loader, device, precision)
    report = metrics_from_predictions(pred, classes, au_names)
    return {"split": split, "run": str(run_dir), **report}
