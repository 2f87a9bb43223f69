"""The `fer` command. Errors the user can fix → exit code 2 and one line (traceback with --debug)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

# Nothing may download at run time: no hub retries, no albumentations version check.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer
from rich.table import Table

from .errors import FerError

app = typer.Typer(
    name="fer",
    help="Train, evaluate and deploy facial-expression recognizers from one TOML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipe_app = typer.Typer(help="Work with recipe files.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

_state = {"debug": False}

Overrides = Annotated[
    Optional[list[str]],
    typer.Option("-o", "--override", help="Override a recipe value: key.path=value (TOML value), repeatable."),
]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _state["debug"] = debug


@app.command()
def run(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe TOML file.", show_default=False)] = None,
    override: Overrides = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<name>-<time>).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory.")] = None,
) -> None:
    """Train a recipe; writes recipe.toml, checkpoints and metrics.json into the run directory."""
    from .console import metrics_tables, stdout
    from .runner import train

    if (recipe is None) == (resume is None):
        raise FerError("give either a RECIPE file or --resume DIR")
    out_dir, final = train(recipe, override or [], out, resume)
    metrics_tables(final, title=f"best checkpoint (epoch {final['best_epoch']}) on validation")
    stdout.print(f"run directory: {out_dir}  (metrics.json, best.pt, last.pt, recipe.toml)")


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `fer run`.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split to evaluate (default: validation).")] = None,
    override: Overrides = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics to this file.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: the recipe's [tta] table, or flips.")] = False,
) -> None:
    """Evaluate a run's best checkpoint on a split of its dataset, or another (-o data.root=...)."""
    from . import ensemble
    from .checkpoint import atomic_write_json
    from .console import metrics_tables, stdout
    from .inference import evaluate

    if ensemble.is_ensemble(run_dir):
        if tta:
            raise FerError("--tta: not supported for ensembles (evaluate the members with --tta)")
        report = ensemble.evaluate(run_dir, split, override or [])
    else:
        report = evaluate(run_dir, split, override or [], tta=tta)
    metrics_tables(report, title=f"{run_dir} on '{report['split']}'")
    inf = report["inference"]
    stdout.print(f"inference: {inf['batched_ms_per_image']:.2f} ms per image (batched)"
                 + (f", {inf['tta_views']} TTA view(s)" if "tta_views" in inf else f", {inf.get('members', 1)} member(s)"))
    if json_out:
        atomic_write_json(json_out, report)


@app.command()
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `fer run`.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Validation split to fit on (never test).")] = None,
) -> None:
    """Fit temperature scaling on validation data and store it in the run's best.pt."""
    from .console import stdout
    from .inference import calibrate as fit

    cal = fit(run_dir, split)
    stdout.print(f"{run_dir}: temperature {cal['temperature']:.3f} fitted on '{cal['split']}'; "
                 f"ECE {cal['ece']:.4f} → {cal['ece_calibrated']:.4f}; NLL {cal['nll']:.4f} → {cal['nll_calibrated']:.4f}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `fer run`.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split to analyse (default: validation).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default RUN/report).")] = None,
    no_gradcam: Annotated[bool, typer.Option("--no-gradcam", help="Skip the Grad-CAM grid (faster).")] = False,
    override: Overrides = None,
) -> None:
    """Write a self-contained HTML report: curves, confusion, per-class bars, confused pairs,
    reliability diagram and Grad-CAM grid."""
    from .console import stdout
    from .report import write_report

    path = write_report(run_dir, out, split=split, overrides=override or [], gradcam=not no_gradcam)
    stdout.print(f"report: {path}")


@app.command()
def explain(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `fer run`.")],
    images: Annotated[list[Path], typer.Argument(help="Face images to explain.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default RUN/explain).")] = None,
    target: Annotated[str, typer.Option("--target", help="Class to explain (default: the predicted one).")] = "predicted",
    layer: Annotated[Optional[str], typer.Option("--layer", help="Module name of the Grad-CAM layer (default: automatic).")] = None,
) -> None:
    """Grad-CAM overlays: which parts of each face drove the prediction."""
    from .console import stdout
    from .explain import explain_images

    paths = explain_images(run_dir, images, out or run_dir / "explain", target=target, layer=layer)
    stdout.print(f"wrote {len(paths)} overlay(s) to {paths[0].parent if paths else out}")


@app.command("ensemble")
def ensemble_(
    sources: Annotated[list[Path], typer.Argument(help="Run directories, or one ensemble recipe (.toml).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the ensemble artifact (must not exist or be empty).")],
    combiner: Annotated[Optional[str], typer.Option("--combiner", help="Ensembler plugin: average, stacking, ...")] = None,
    fit_split: Annotated[Optional[str], typer.Option("--fit-split", help="Split to fit weights on (default val; never test).")] = None,
    max_size_mb: Annotated[Optional[float], typer.Option("--max-size-mb", help="Refuse ensembles larger than this (default 500).")] = None,
    override: Overrides = None,
) -> None:
    """Combine trained runs (classes matched by name) into a reusable ensemble artifact."""
    from . import ensemble
    from .console import metrics_tables, stdout
    from .recipe import apply_overrides, read_toml

    if len(sources) == 1 and sources[0].suffix == ".toml":
        raw = apply_overrides(read_toml(sources[0]), override or [])
        where = str(sources[0])
    else:
        raw = apply_overrides({"members": [str(s) for s in sources]}, override or [])
        where = "command line"
    raw.update({k: v for k, v in {"combiner": {"plugin": combiner} if combiner else None, "fit_split": fit_split,
                                  "max_size_mb": max_size_mb}.items() if v is not None})
    spec = ensemble.validate_spec(raw, where)
    report = ensemble.build(spec, out)
    metrics_tables(report, title=f"ensemble of {len(spec.members)} on '{report['split']}'")
    table = Table(title="members")
    for col in ("run", "accuracy", "macro-F1", "ECE", "MB", "ms/img (batch)", "ms/img (single)"):
        table.add_column(col)
    for m in report["members"] + [{"run": "ensemble", **{k: report[k] for k in ("accuracy", "macro_f1", "ece", "size_mb", "batched_ms_per_image", "single_image_ms")}}]:
        table.add_row(m["run"], f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['ece']:.4f}", f"{m['size_mb']:.1f}",
                      f"{m['batched_ms_per_image']:.2f}", f"{m['single_image_ms']:.1f}")
    stdout.print(table)
    stdout.print(f"ensemble written to {out} ({report['size_mb']:.1f} MB of weights)")


@app.command()
def data(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    override: Overrides = None,
) -> None:
    """Validate every label line and print per-split, per-class counts (and AU frequencies)."""
    from .build import build_source, build_splits
    from .console import stdout
    from .recipe import apply_overrides, read_toml, validate
    from .registry import get_registry

    rec = validate(apply_overrides(read_toml(recipe), override or []), str(recipe))
    reg = get_registry(rec.plugins.disable)
    source = build_source(rec, reg)
    splits = build_splits(rec, reg, source=source)
    table = Table(title=f"{rec.data.plugin} dataset: {len(splits.classes)} classes")
    table.add_column("class")
    names = ["train (used)", "val (used)"] + sorted(source.splits)
    for n in names:
        table.add_column(n, justify="right")
    counts = [Counter(s.label for s in splits.train), Counter(s.label for s in splits.val)]
    counts += [Counter(s.label for s in source.splits[n]) for n in sorted(source.splits)]
    for i, c in enumerate(splits.classes):
        table.add_row(c, *[str(cnt.get(i, 0)) for cnt in counts])
    table.add_row("[bold]total", *[str(sum(cnt.values())) for cnt in counts])
    stdout.print(table)
    if splits.au_names:
        info = splits.task_info()
        labelled = info.au_labelled
        au = Table(title=f"AU frequency in train ({labelled} images with AU labels)")
        au.add_column("AU")
        au.add_column("positives", justify="right")
        au.add_column("rate", justify="right")
        for name, pos in zip(splits.au_names, info.au_positive_counts):
            au.add_row(name, str(pos), f"{pos / max(labelled, 1):.3f}")
        stdout.print(au)
    for note in splits.notes:
        stdout.print(f"note: {note}")
    if splits.skipped:
        stdout.print(f"skipped {splits.skipped} missing/unreadable image(s)")
    stdout.print("all label lines valid; all images present")


@recipe_app.command("check")
def recipe_check(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    override: Overrides = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved recipe.")] = False,
) -> None:
    """Validate a recipe (structure and every plugin's parameters) without running anything."""
    from .console import stdout
    from .recipe import apply_overrides, dump_toml, load, read_toml

    data = apply_overrides(read_toml(recipe), override or [])
    if "members" in data:  # an ensemble recipe
        from .ensemble import validate_spec

        raw = validate_spec(data, str(recipe)).model_dump(mode="json")
    else:
        _, raw = load(recipe, override or [])
    if show:
        stdout.print(dump_toml(raw), markup=False, highlight=False)
    stdout.print(f"{recipe}: valid")


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List every registered component: kind, name, plugin, distribution and version."""
    from .console import stdout
    from .registry import get_registry

    rows = get_registry().rows()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="fer plugins")
    for col in ("kind", "name", "plugin", "distribution", "version"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["kind"], r["name"], r["plugin"], r["distribution"], r["version"])
    stdout.print(table)


def main() -> None:
    try:
        app()
    except FerError as e:
        if _state["debug"]:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
