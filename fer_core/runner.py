"""`fer run` and `fer run --resume`: a locked run directory around the engine."""

from __future__ import annotations

import datetime as dt
import re
import traceback
from pathlib import Path
from typing import Any

from . import dist
from .build import build_all
from .console import ProgressBar, console, warn
from .engine import Engine, EngineConfig
from .errors import FerError
from .interfaces import RunInfo
from .plots import confusion_matrix_png
from .predictor import calibration_report, fit_calibrator
from .recipe import Recipe, apply_overrides, dump_toml, read_toml, resolved, validate
from .registry import get_registry
from .rundir import RunDir

#: recipe keys a resumed run may change; everything else would make its checkpoints lie
RESUMABLE = ("train.epochs", "train.num_workers", "train.threads", "train.pin_memory", "train.eval_batch_size",
             "train.early_stopping_patience", "tracking", "callbacks", "name", "description")


def default_out_dir(recipe: Recipe) -> Path:
    """runs/<name>-<time>, made here and now so that two launches in one second never share it."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe.name).strip("-") or "run"
    for n in range(1, 1000):
        out = Path("runs") / (f"{safe}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            out.mkdir(parents=True, exist_ok=False)
            return out
        except FileExistsError:
            continue
    raise FerError(f"runs/: could not create a new run directory for '{safe}'")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys a resume would change, refusing those it cannot honour (before anything is written)."""
    a, b = _flat(saved), _flat(wanted)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    refused = [k for k in changed if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]
    if refused:
        raise FerError(f"--resume: these changes cannot apply to a run that has started: {', '.join(refused)} "
                       "(start a new run with --out)")
    if "train.epochs" in changed:
        old, new = changed["train.epochs"]
        if wanted.get("schedule"):
            raise FerError(f"--resume: train.epochs {old} → {new}: the schedule '{wanted['schedule']['plugin']}' was "
                           "laid out for the old length and would not extend correctly; start a new run")
        if new < old:
            raise FerError(f"--resume: train.epochs {old} → {new}: fewer epochs than planned; the best checkpoint "
                           "so far is already in best.pt")
    return changed


def train(recipe_path: Path | None, overrides: list[str], out_dir: Path | None, resume_dir: Path | None, *,
          group: dict[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Validate everything, then train; returns (run dir, final metrics). ``group``: see RunInfo.group."""
    if resume_dir is not None:
        rd = RunDir(resume_dir).require_run()
        rpath = rd / RunDir.RECIPE
        saved = read_toml(rpath)
        recipe = validate(apply_overrides(saved, overrides), str(rpath))
    else:
        assert recipe_path is not None
        recipe = validate(apply_overrides(read_toml(recipe_path), overrides), str(recipe_path))
        if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
            raise FerError(f"--out {out_dir}: exists and is not a directory")
        rd = None
    n = dist.world_size()
    if recipe.train.batch_size % n:  # before joining the process group: every rank refuses on its own
        raise FerError(f"train.batch_size: {recipe.train.batch_size} is the global batch and must divide by the {n} processes")
    dist.init()  # under torchrun: join the process group
    if rd is None:
        rd = RunDir(dist.broadcast(out_dir or default_out_dir(recipe)))  # one directory, named by rank 0's clock
    with rd.lock():
        return _train_locked(rd, recipe, resume_dir is not None, overrides, group)


def _train_locked(rd: RunDir, recipe: Recipe, resuming: bool, overrides: list[str],
                  group: dict[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    out = rd.path
    resolved_recipe = resolved(recipe)
    changes: dict[str, tuple[Any, Any]] = {}
    if resuming:
        saved = resolved(validate(read_toml(rd / RunDir.RECIPE), str(rd / RunDir.RECIPE)))
        changes = resume_changes(saved, resolved_recipe)
    elif rd.has_checkpoint():
        raise FerError(f"{out}: already holds a run; continue it with `fer run --resume {out}` or choose another --out")
    rd.clean_stale_tmp()
    reg = get_registry(recipe.plugins.disable)
    built = build_all(recipe, reg)
    _check_monitor(recipe, built.splits.au_names, "au" in built.model.heads)
    run = RunInfo(out_dir=out, recipe=resolved_recipe, classes=list(built.splits.classes),
                  resumed=resuming, plugin_versions=reg.versions(), group=group)
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
        finalize=lambda final: _write_results(rd, recipe, reg, final, engine),
    )
    if resuming and rd.has_checkpoint():
        try:
            engine.restore(rd.load(RunDir.LAST, built.device))
        except (KeyError, RuntimeError, ValueError) as e:  # a torch file, but not this run's state
            raise FerError(f"{rd / RunDir.LAST}: not a checkpoint of this run ({type(e).__name__}: {str(e)[:200]})") from None
        console.print(f"resuming {out} after epoch {engine.state.epoch}/{t.epochs}", markup=False)
    # only now, with everything validated, built and restored (a garbage last.pt), does the directory change
    rd.write_text(RunDir.RECIPE, dump_toml(resolved_recipe))
    for key, (old, new) in changes.items():
        rd.log_resume(f"{key}: {old!r} -> {new!r} (overrides: {' '.join(overrides)})")
    skipped = built.splits.skipped
    console.print(
        f"{recipe.name}: {len(built.splits.train)} train / {len(built.splits.val)} val images, "
        f"{len(built.splits.classes)} classes; device {built.device}, precision {built.precision.name} "
        f"({built.precision.reason}), channels_last {built.channels_last}; run dir {out}"
        + (f"; skipped {skipped} unreadable image(s)" if skipped else ""), markup=False, highlight=False)
    for w in built.splits.warnings:  # duplicates across train/val, empty classes, skipped images
        warn(w)
    rd.write_status(status="running", device=str(built.device), precision=built.precision.name,
                    precision_reason=built.precision.reason, skipped_images=skipped,
                    started=dt.datetime.now().isoformat(timespec="seconds"),
                    drop=("error", "traceback", "ended"))
    try:
        final = engine.fit()
    except BaseException as e:
        rd.write_status(status="failed", error=f"{type(e).__name__}: {e}",
                        ended=dt.datetime.now().isoformat(timespec="seconds"),
                        traceback=traceback.format_exc(limit=20) if not isinstance(e, FerError) else "")
        raise
    final["files"] = {k: str(v) for k, v in run.files.items()}
    return out, final


def _check_monitor(recipe: Recipe, au_names: list[str], au_head: bool) -> None:
    produced = ["accuracy", "macro_f1", "balanced_accuracy", "num_samples"] + (["au_mean_f1"] if au_names and au_head else [])
    if recipe.train.monitor not in produced:
        from .registry import _did_you_mean

        raise FerError(f"train.monitor: metric '{recipe.train.monitor}' is not produced by this run"
                       f"{_did_you_mean(recipe.train.monitor, produced)}; available: {', '.join(produced)}")


def _write_results(rd: RunDir, recipe: Recipe, reg: Any, final: dict[str, Any], engine: Engine) -> None:
    if not dist.is_main():
        return
    # the recipe's calibrator, fitted on the validation logits of the best checkpoint, stored with it
    pred = engine.last_predictions
    cal, stored = fit_calibrator(recipe, reg, pred["logits.emotion"], pred["label"])
    final["calibration"] = {**calibration_report(pred["logits.emotion"], cal(pred["logits.emotion"]), pred["label"]),
                            "calibrator": stored["plugin"], "state": stored["state"],
                            "split": recipe.data.val_split, "in_sample": True}
    rd.store_calibration(stored)
    files = engine.run.files
    files["best"], files["last"], files["recipe"] = rd / RunDir.BEST, rd / RunDir.LAST, rd / RunDir.RECIPE
    files["metrics"] = rd.write_json(RunDir.METRICS, {"split": recipe.data.val_split, **final})
    files["history"] = rd.write_json(RunDir.HISTORY, engine.state.history)
    files["confusion_matrix"] = confusion_matrix_png(
        final["confusion_matrix"], final["classes"], rd / RunDir.CONFUSION,
        title=f"{recipe.name}: validation, best epoch {final['best_epoch']}")
    rd.write_status(status="finished", ended=dt.datetime.now().isoformat(timespec="seconds"))



