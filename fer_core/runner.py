"""`fer run`, `fer run --resume`, `fer eval`: run directories around the engine."""

from __future__ import annotations

import datetime as dt
import json
import re
import traceback
from pathlib import Path
from typing import Any

from . import checkpoint, dist
from .build import build_all
from .console import ProgressBar, console
from .calibration import calibration_report, fit_temperature
from .engine import BEST, LAST, Engine, EngineConfig
from .errors import FerError
from .interfaces import RunInfo
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
        finalize=lambda final: _write_results(out, recipe, final, engine),
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


def _write_results(out: Path, recipe: Recipe, final: dict[str, Any], engine: Engine) -> None:
    if not dist.is_main():
        return
    # temperature scaling on the validation logits of the best checkpoint, stored with it
    pred = engine.last_predictions
    temperature = fit_temperature(pred["logits.emotion"], pred["label"])
    final["calibration"] = calibration_report(pred["logits.emotion"], pred["label"], temperature)
    best = checkpoint.load(out / BEST)
    best["temperature"] = temperature
    checkpoint.save(out / BEST, best)
    checkpoint.atomic_write_json(out / METRICS_FILE, {"split": recipe.data.val_split, **final})
    checkpoint.atomic_write_json(out / HISTORY_FILE, engine.state.history)
    confusion_matrix_png(final["confusion_matrix"], final["classes"], out / "confusion_matrix.png",
                         title=f"{recipe.name}: validation, best epoch {final['best_epoch']}")
    _write_status(out, status="finished", ended=dt.datetime.now().isoformat(timespec="seconds"))


