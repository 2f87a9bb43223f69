"""Cross-validation and seed repeats: the ``folds`` dataset, ``fer cv`` and ``fer repeat``.

- ``folds`` (a dataset that wraps another, ``source``): pools the source's training and
  validation splits, cuts the pool into ``k`` folds and serves fold ``fold`` as ``val`` and the
  rest as ``train``; every other split of the source (``test``) passes through untouched. Folds
  are stratified by class and, when the images carry groups (``Sample.group``: csv
  ``group_column``, folder ``group_pattern``), group-disjoint — scikit-learn's
  ``StratifiedGroupKFold``, the splitter the core's own validation hold-out uses. ``mode =
  "predefined"``: the folds are the distinct group values (e.g. CK+'s ``fold`` column).
- ``fer cv RECIPE --folds K``: one run per fold (and per repeat), resumable, summarised in
  ``cv.json`` with mean ± std over folds and out-of-fold metrics over every pooled image.
- ``fer repeat RECIPE --seeds 0,1,2``: one run per training seed, the same summary in
  ``repeat.json``.

See docs/crossval.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import tomllib
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import numpy as np
import typer
from pydantic import Field
from rich.table import Table
from rich.text import Text

from fer_core.api import (DataSource, FerError, Overrides, Recipe, RunDir, Sample, apply_overrides, atomic_write_bytes,
                          atomic_write_json, atomic_write_text, classification_metrics, confusion_matrix_png, console,
                          dump_toml, get_registry, hookimpl, load_predictor, read_toml, sigmoid, softmax,
                          split_samples, stdout, train, traits, validate)

#: the core's own [data] keys: they stay at the top of a fold's [data] table, never in `source`
CORE_DATA_KEYS = tuple(k for k in Recipe.model_fields["data"].annotation.model_fields if k != "plugin")
CV_JSON, REPEAT_JSON = "cv.json", "repeat.json"
CV_RECIPE, REPEAT_RECIPE = "cv_recipe.toml", "repeat_recipe.toml"
SUMMARY_COLUMNS = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced acc"),
                   ("au_mean_f1", "AU mean F1"))


# ------------------------------------------------------------------ the splitter


def group_keys(samples: Sequence[Sample]) -> list[str]:
    """One group per sample; an ungrouped sample is a group of its own (as in the core's hold-out)."""
    return [s.group if s.group is not None else f"\0{i}" for i, s in enumerate(samples)]


def folds(samples: Sequence[Sample], k: int, seed: int) -> list[list[int]]:
    """``k`` validation folds (sorted sample indices) partitioning ``samples``: StratifiedKFold, or
    StratifiedGroupKFold when any sample has a group (no group in two folds). Its first fold is
    the core's group-aware hold-out for ``val_fraction = 1/k``."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = [s.label for s in samples]
    grouped = any(s.group is not None for s in samples)
    groups = group_keys(samples)
    n = len(set(groups)) if grouped else len(samples)
    if n < k:
        raise FerError(f"data.k: cannot make {k} folds of {n} {'groups' if grouped else 'images'}")
    with warnings.catch_warnings():  # "the least populated class has fewer than k members": shown as a note
        warnings.simplefilter("ignore", UserWarning)
        if grouped:
            parts = StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(groups, labels, groups)
        else:
            parts = StratifiedKFold(k, shuffle=True, random_state=seed).split(labels, labels)
        return [sorted(int(i) for i in va) for _, va in parts]


def _natural(value: str) -> tuple[int, Any]:
    return (0, int(value)) if re.fullmatch(r"-?\d+", value) else (1, value)


def predefined_folds(samples: Sequence[Sample]) -> tuple[list[str], list[list[int]]]:
    """The distinct group values (integers numerically, then the rest as text) and their indices."""
    missing = [s for s in samples if s.group is None]
    if missing:
        raise FerError(f"data.mode: 'predefined' folds need a group (fold id) on every pooled image; "
                       f"{len(missing)} have none, e.g. {missing[0].path}")
    values = sorted({str(s.group) for s in samples}, key=_natural)
    at = {v: i for i, v in enumerate(values)}
    parts: list[list[int]] = [[] for _ in values]
    for i, s in enumerate(samples):
        parts[at[str(s.group)]].append(i)
    return values, parts


# ------------------------------------------------------------------ the `folds` dataset


@hookimpl
def register_datasets(register):
    register("folds", make_folds)


@traits(nested={"source": "dataset"}, example={"k": 2, "fold": 0})  # source: see tests/test_contracts.py
def make_folds(
    *,
    source: dict[str, Any],
    k: Annotated[int, Field(ge=2)],
    fold: Annotated[int, Field(ge=0)],
    seed: int = 0,
    mode: Literal["stratified", "predefined"] = "stratified",
    pool: list[str] = ["train", "val"],  # noqa: B006
) -> DataSource:
    """Fold `fold` of `k` of the `source` dataset's pooled `pool` splits (its train and val) as
    `val`, the other folds as `train`; other splits (test) unchanged. `mode = "predefined"`: the
    folds are the images' distinct group values (e.g. csv `group_column = "fold"`)."""
    src: DataSource = source  # type: ignore[assignment]  # built by the registry from the table
    if fold >= k:
        raise FerError(f"data.fold: {fold} is not below data.k = {k} (folds are numbered 0 to {k - 1})")
    if not pool or pool[0] not in src.splits:
        raise FerError(f"data.pool: split '{pool[0] if pool else ''}' not found; the dataset has: "
                       f"{', '.join(sorted(src.splits)) or '(none)'}")
    pooled = [p for p in dict.fromkeys(pool) if p in src.splits]
    samples = [s for p in pooled for s in src.splits[p]]
    others = {name: list(v) for name, v in src.splits.items() if name not in pool}
    if clash := sorted({"train", "val"} & set(others)):
        raise FerError(f"data.pool: the dataset's split(s) {', '.join(clash)} are not pooled but would be replaced "
                       "by the folds; add them to data.pool")
    grouped = any(s.group is not None for s in samples)
    if mode == "predefined":
        values, parts = predefined_folds(samples)
        if len(values) != k:
            raise FerError(f"data.k: {k}, but the pool has {len(values)} predefined folds ({', '.join(values)})")
        how = f"predefined folds = the {k} group values {', '.join(values)}; fold {fold} is {values[fold]!r}"
    else:
        parts = folds(samples, k, seed)
        how = f"stratified {'and group-disjoint ' if grouped else ''}folds (seed {seed})"
    in_val = set(parts[fold])
    val = [samples[i] for i in parts[fold]]
    train = [s for i, s in enumerate(samples) if i not in in_val]
    notes = [*src.notes, f"folds: pooled {' + '.join(f'{p} ({len(src.splits[p])})' for p in pooled)} = "
             f"{len(samples)} images into {k} {how}; fold {fold}: {len(val)} val / {len(train)} train"
             + (f"; untouched: {', '.join(f'{n} ({len(v)})' for n, v in others.items())}" if others else "")]
    counts = np.bincount([s.label for s in samples], minlength=len(src.classes))
    if (small := [c for c, n in zip(src.classes, counts) if 0 < n < k]) and mode == "stratified":
        notes.append(f"folds: class(es) with fewer than {k} pooled images, so some folds have none: {', '.join(small)}")
    return DataSource(classes=list(src.classes), splits={"train": train, "val": val, **others},
                      au_names=list(src.au_names), notes=notes,
                      description=f"fold {fold} of {k} of: {src.description}")


# ------------------------------------------------------------------ running and summarising


def _stamp_dir(name: str, what: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    return Path("runs") / f"{safe}-{what}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _same_plan(path: Path, plan: dict[str, Any], what: str) -> None:
    """A second launch into the same directory continues it only with the same recipe. The
    description is a label, not a setting (a resumed run may change it too: fer_core.runner), so a
    relabelled recipe continues its directory; the saved plan is left as it was written."""
    text = dump_toml(plan)
    if path.is_file():
        def setting(d: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in d.items() if k != "description"}

        if setting(read_toml(path)) != setting(tomllib.loads(text)):
            raise FerError(f"{path.parent}: holds a {what} of another recipe or other options (see {path}); "
                           "continue it with the same command, or choose another --out")
    else:
        atomic_write_text(path, text)


def run_group(kind: str, group_dir: Path, member: str) -> dict[str, str]:
    """The run group (``RunInfo.group``) of one fold or seed: trackers nest the runs of one
    cv or repeat directory under one parent (MLflow: a parent run)."""
    path = group_dir.resolve()
    return {"kind": kind, "id": str(path), "name": path.name, "member": member}


def run_or_resume(run_dir: Path, recipe_path: Path, overrides: list[str],
                  group: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """A finished run (metrics.json) is read; one with a checkpoint is resumed; else it starts."""
    rd = RunDir(run_dir)
    if (rd / RunDir.METRICS).is_file():
        state = "finished earlier"
    elif rd.has_checkpoint():
        train(None, [], None, run_dir, group=group)
        state = "resumed"
    else:
        train(recipe_path, overrides, run_dir, None, group=group)
        state = "trained"
    return rd.read_json(RunDir.METRICS, {}), state


def scalar_metrics(m: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.json: top-level scalars and the calibration's (``calibration.ece``)."""
    out = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({f"calibration.{k}": float(v) for k, v in (m.get("calibration") or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def mean_std(rows: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float | None]]:
    """Mean and sample standard deviation (ddof = 1; None for one run) of every metric all runs have."""
    keys = [k for k in rows[0] if all(k in r for r in rows)] if rows else []
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    std = {k: (float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else None) for k in keys}
    return mean, std


def summary_table(title: str, runs: Sequence[dict[str, Any]], mean: dict[str, float],
                  std: dict[str, float | None], oof: dict[str, Any] | None = None) -> Table:
    """One row per run, then mean ± std, then the out-of-fold metrics (cv)."""
    cols = [(k, name) for k, name in SUMMARY_COLUMNS if k in mean]
    table = Table(title=Text(title))
    table.add_column("run", no_wrap=True)
    table.add_column("val images", justify="right")
    for _, name in cols:
        table.add_column(name, justify="right")
    for r in runs:
        m = r["metrics"]
        table.add_row(Text(r["dir"]), str(int(m.get("num_samples", 0))), *(f"{m[k]:.4f}" for k, _ in cols))
    table.add_section()
    table.add_row(Text(f"mean of {len(runs)}"), "", *(f"{mean[k]:.4f}" for k, _ in cols))
    table.add_row(Text("std (ddof=1)"), "", *(f"{std[k]:.4f}" if std[k] is not None else "-" for k, _ in cols))
    if oof is not None:
        table.add_row(Text("out-of-fold"), str(oof["num_samples"]),
                      *(f"{oof[k]:.4f}" if k in oof else "" for k, _ in cols))
    return table


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    mean, std = mean_std([r["metrics"] for r in runs])
    return {"mean": mean, "std": std}


# ------------------------------------------------------------------ out-of-fold predictions


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def val_predictions(run_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """The run's calibrated probabilities on its validation split (cached in the cv directory,
    keyed by the run's metrics.json so a retrained fold is predicted again)."""
    key = _sha(run_dir / RunDir.METRICS)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return {k: z[k] for k in z.files}
    pred = load_predictor(run_dir)
    _, samples = split_samples(pred, "val")
    p = pred.predict(samples)
    out = {"key": np.array(key), "path": np.array([str(s.path) for s in samples]), "label": p["label"],
           "probs": softmax(p["calibrated.emotion"]), "classes": np.array(pred.classes),
           "au_names": np.array(pred.au_names, dtype=str)}
    if "logits.au" in p and pred.au_names:
        out.update({"au": p["au"], "au_mask": p.get("au_mask", np.ones_like(p["au"])), "au_probs": sigmoid(p["logits.au"])})
    buf = io.BytesIO()
    np.savez(buf, **out)
    atomic_write_bytes(cache, buf.getvalue())
    return out


def oof_metrics(preds: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Metrics of all folds' validation predictions together (each pooled image once per repeat)."""
    classes = [str(c) for c in preds[0]["classes"]]
    au_names = [str(a) for a in preds[0]["au_names"]]
    cat = lambda key: np.concatenate([p[key] for p in preds])  # noqa: E731
    has_au = all("au" in p for p in preds) and au_names
    m = classification_metrics(cat("label"), cat("probs"), classes,
                               au_true=cat("au") if has_au else None, au_probs=cat("au_probs") if has_au else None,
                               au_mask=cat("au_mask") if has_au else None, au_names=au_names if has_au else ())
    m["num_images"] = int(len(set(cat("path").tolist())))
    return m


# ------------------------------------------------------------------ fer cv


def cross_validate(recipe_path: Path, k: int | None, *, group_by: str | None = None, folds_from: str | None = None,
                   repeats: int = 1, out: Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`fer cv`: returns what it writes to ``CV_DIR/cv.json``."""
    if group_by and folds_from:
        raise FerError("--group-by and --folds-from: give one (--folds-from already groups by its column)")
    if repeats < 1:
        raise FerError(f"--repeats: {repeats}; expected at least 1")
    raw = apply_overrides(read_toml(recipe_path), list(overrides))
    recipe = validate(raw, str(recipe_path))
    data = dict(raw.get("data") or {})
    if data.get("plugin") == "folds":
        raise FerError(f"{recipe_path}: [data] is already a 'folds' dataset; give `fer cv` the recipe of its source")
    source = {key: v for key, v in data.items() if key not in CORE_DATA_KEYS}
    core = {key: v for key, v in data.items() if key in CORE_DATA_KEYS}
    reg = get_registry(recipe.plugins.disable)
    column = group_by or folds_from
    if column:
        comp = reg.get("dataset", source["plugin"], "data")
        if "group_column" not in comp.params():
            raise FerError(f"--{'group-by' if group_by else 'folds-from'}: the '{source['plugin']}' dataset has no "
                           f"group_column parameter (its parameters: {', '.join(comp.params())}); set its own "
                           "grouping in the recipe (e.g. the folder reader's group_pattern)")
        source["group_column"] = column
    mode = "predefined" if folds_from else "stratified"
    pool_splits = [recipe.data.train_split, recipe.data.val_split]
    built = reg.build("dataset", source, "data")
    if k is None:
        if mode != "predefined":
            raise FerError("--folds K: how many folds (or --folds-from COLUMN for the dataset's own folds)")
        k = len({s.group for p in pool_splits for s in built.splits.get(p, ()) if s.group is not None})
        if k < 2:
            raise FerError(f"--folds-from {column}: the pooled splits have {k} distinct value(s) in that column; "
                           "predefined folds need at least 2")
    seed0 = recipe.train.seed
    folds_spec = {"plugin": "folds", "source": source, "k": k, "fold": 0, "seed": seed0, "mode": mode,
                  "pool": pool_splits}
    fold_table = {**core, "train_split": "train", "val_split": "val", **folds_spec}
    plan = {**raw, "data": fold_table}
    validate(plan, f"{recipe_path} (as folds)")  # everything refused before any run starts
    cv_dir = out or _stamp_dir(recipe.name, "cv")
    cv_dir.mkdir(parents=True, exist_ok=True)
    plan_path = cv_dir / CV_RECIPE
    _same_plan(plan_path, plan, "cross-validation")

    val_name, train_name = recipe.data.val_split, recipe.data.train_split
    pooled = {p: len(built.splits[p]) for p in dict.fromkeys(pool_splits) if p in built.splits}
    untouched = {n: len(v) for n, v in built.splits.items() if n not in pool_splits}
    console.print(f"cross-validation of {recipe_path}: {k} {mode} folds"
                  + (f" grouped by '{column}'" if column else "") + f", {repeats} repeat(s) → {cv_dir}",
                  markup=False, highlight=False)
    console.print(f"pool = {' + '.join(f'{p} ({n})' for p, n in pooled.items())} = {sum(pooled.values())} images: "
                  + (f"the recipe's validation split '{val_name}' is folded into the pool (each fold's val selects "
                     "the checkpoint)" if val_name in pooled else
                     f"the recipe has no '{val_name}' split, so the pool is '{train_name}'")
                  + "; " + (f"untouched: {', '.join(f'{n} ({c})' for n, c in untouched.items())} — evaluate on it once, "
                            "after choosing" if untouched else "no other split"), markup=False, highlight=False)

    runs: list[dict[str, Any]] = []
    oof_by_repeat: list[dict[str, Any]] = []
    all_preds: list[dict[str, np.ndarray]] = []
    for r in range(repeats):
        seed = seed0 + r
        preds = []
        for f in range(k):
            rel = f"fold-{f}" if repeats == 1 else f"repeat-{r}/fold-{f}"
            run_dir = cv_dir / rel
            fold_data = reg.build("dataset", {**folds_spec, "fold": f, "seed": seed}, "data")
            metrics, state = run_or_resume(run_dir, plan_path, [f"data.fold={f}", f"data.seed={seed}",
                                                                f"name={json.dumps(f'{recipe.name}-cv-{rel}')}"],
                                           run_group("cv", cv_dir, rel))
            console.print(f"{rel}: {state}", markup=False, highlight=False)
            p = val_predictions(run_dir, cv_dir / "predictions" / f"{rel.replace('/', '-')}.npz")
            preds.append(p)
            groups = sorted({s.group for s in fold_data.splits["val"] if s.group is not None}, key=_natural)
            runs.append({"repeat": r, "fold": f, "seed": seed, "dir": rel, "num_train": len(fold_data.splits["train"]),
                         "num_val": len(fold_data.splits["val"]), "val_groups": groups,
                         "metrics": scalar_metrics(metrics)})
        oof = oof_metrics(preds)
        oof_by_repeat.append({k2: v for k2, v in oof.items() if not isinstance(v, (dict, list))})
        all_preds += preds
    oof = oof_metrics(all_preds)
    png = confusion_matrix_png(oof["confusion_matrix"], oof["classes"], cv_dir / "confusion_matrix.png",
                               title=f"{recipe.name}: out-of-fold, {k} folds" + (f" × {repeats}" if repeats > 1 else ""))
    report = {"kind": "cv", "recipe": str(recipe_path), "overrides": list(overrides), "k": k, "repeats": repeats,
              "mode": mode, "group_column": column or source.get("group_column") or None, "seed": seed0,
              "pool": {"splits": pooled, "size": sum(pooled.values())}, "untouched": untouched,
              "runs": runs, **_summary(runs), "oof": {**oof, "predictions_per_image": repeats},
              "oof_by_repeat": oof_by_repeat if repeats > 1 else None, "confusion_matrix_png": str(png)}
    atomic_write_json(cv_dir / CV_JSON, report)
    stdout.print(summary_table(f"{recipe.name}: {k}-fold cross-validation ({cv_dir})", runs, report["mean"],
                               report["std"], oof), markup=False)
    stdout.print(f"wrote {cv_dir / CV_JSON} and {png}", markup=False, highlight=False)
    return report


# ------------------------------------------------------------------ fer repeat


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FerError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FerError(f"--seeds {text!r}: expected distinct integers separated by commas, e.g. 0,1,2")
    return seeds


def repeat_seeds(recipe_path: Path, seeds: Sequence[int], *, out: Path | None = None,
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`fer repeat`: one run per training seed; returns what it writes to ``DIR/repeat.json``."""
    raw = apply_overrides(read_toml(recipe_path), list(overrides))
    recipe = validate(raw, str(recipe_path))
    for n in seeds:
        validate(apply_overrides(raw, [f"train.seed={n}"]), str(recipe_path))
    rep_dir = out or _stamp_dir(recipe.name, "repeat")
    rep_dir.mkdir(parents=True, exist_ok=True)
    _same_plan(rep_dir / REPEAT_RECIPE, raw, "seed repeat")
    console.print(f"seed repeats of {recipe_path}: seeds {', '.join(map(str, seeds))} → {rep_dir}",
                  markup=False, highlight=False)
    runs = []
    for n in seeds:
        rel = f"seed-{n}"
        metrics, state = run_or_resume(rep_dir / rel, rep_dir / REPEAT_RECIPE,
                                       [f"train.seed={n}", f"name={json.dumps(f'{recipe.name}-{rel}')}"],
                                       run_group("repeat", rep_dir, rel))
        console.print(f"{rel}: {state}", markup=False, highlight=False)
        runs.append({"seed": n, "dir": rel, "metrics": scalar_metrics(metrics)})
    report = {"kind": "repeat", "recipe": str(recipe_path), "overrides": list(overrides), "seeds": list(seeds),
              "runs": runs, **_summary(runs)}
    atomic_write_json(rep_dir / REPEAT_JSON, report)
    stdout.print(summary_table(f"{recipe.name}: {len(seeds)} seeds ({rep_dir})", runs, report["mean"], report["std"]),
                 markup=False)
    stdout.print(f"wrote {rep_dir / REPEAT_JSON}", markup=False, highlight=False)
    return report


@hookimpl
def register_commands(cli):
    @cli.command("cv", epilog="Examples: fer cv recipes/ckplus_multitask.toml --folds 5 --group-by subject ;  "
                              "fer cv recipes/ckplus_multitask.toml --folds-from fold --out runs/ck-cv")
    def cv(
        recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.", show_default=False)],
        folds_: Annotated[Optional[int], typer.Option("--folds", help="Number of folds K (≥ 2).")] = None,
        group_by: Annotated[Optional[str], typer.Option(
            "--group-by", help="Data column of each image's group (e.g. subject): no group in two folds.")] = None,
        folds_from: Annotated[Optional[str], typer.Option(
            "--folds-from", help="Data column holding predefined fold ids (K = their number unless given).")] = None,
        repeats: Annotated[int, typer.Option("--repeats", help="Repeat with fold seeds train.seed + r.")] = 1,
        out: Annotated[Optional[Path], typer.Option(
            "--out", help="Cross-validation directory (default runs/<name>-cv-<time>); rerun to resume.")] = None,
        override: Overrides = None,
    ) -> None:
        """K-fold cross-validation: pools the recipe's train and val splits (test untouched), one run
        per fold, mean ± std and out-of-fold metrics in CV_DIR/cv.json."""
        cross_validate(recipe, folds_, group_by=group_by, folds_from=folds_from, repeats=repeats, out=out,
                       overrides=override or [])

    @cli.command("repeat", epilog="Example: fer repeat recipes/quickstart.toml --seeds 0,1,2 --out runs/qs-seeds")
    def repeat(
        recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.", show_default=False)],
        seeds: Annotated[str, typer.Option("--seeds", help="Training seeds, comma-separated (e.g. 0,1,2).")],
        out: Annotated[Optional[Path], typer.Option(
            "--out", help="Directory of the runs (default runs/<name>-repeat-<time>); rerun to resume.")] = None,
        override: Overrides = None,
    ) -> None:
        """The recipe once per training seed (DIR/seed-N), mean ± std in DIR/repeat.json."""
        repeat_seeds(recipe, parse_seeds(seeds), out=out, overrides=override or [])
