"""Ensembles of trained artifacts: the `fer ensemble` command, the `ensemble` artifact (an
ensemble directory loads as one Predictor: `fer eval`, teachers, reports) and ensemble recipes
(`fer recipe check recipes/ensemble.toml`).

Members are anything ``load_predictor`` opens (runs, other ensembles, exported models) and may
differ in backbone, input size, channels and class order: each member sees the images through
its own stored preprocessing and its own calibration, and its scores are re-ordered into the
ensemble's class order (the first member's) by name. The combiner (an `ensembler` plugin) is
fitted on the validation split — never on a split named test — and its state is stored in
``ensemble.json`` next to copies of the members, so the directory is self-contained.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import numpy as np
import torch
import typer
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from rich.table import Table

from fer_core.api import (KINDS, FerError, Overrides, Predictor, Preprocessing, RecipeTable, RunDir, Sample,
                          TestTimeAugmentation, apply_overrides, atomic_write_json, atomic_write_text, class_index,
                          classification_metrics, dump_toml, get_registry, guard_not_test, hookimpl, load_predictor,
                          metrics_tables, read_toml, reliability, shipped_model, single_image_latency_ms, softmax,
                          split_samples, stdout, validation_message)

ENSEMBLE_FILE = "ensemble.json"
#: the ensembler a recipe (or the command line) falls back to
DEFAULT_COMBINER: str = next(k.default for k in KINDS if k.name == "ensembler")


# ------------------------------------------------------------------ recipes


class EnsembleSpec(BaseModel):
    """An ensemble recipe (recipes/ensemble.toml), or the command line's equivalent."""

    model_config = ConfigDict(extra="forbid")
    name: str = "ensemble"
    members: list[str] = Field(min_length=1)
    fit_split: str = "val"
    max_size_mb: float = Field(500.0, gt=0)
    combiner: RecipeTable = Field(default_factory=lambda: RecipeTable(plugin=DEFAULT_COMBINER))


def validate_spec(raw: dict[str, Any], source: str) -> EnsembleSpec:
    """Structure, then the combiner table against its plugin (its defaults filled in, so the
    saved ensemble.toml states every value). A combiner table without ``plugin`` (e.g. only
    ``-o combiner.weights=[...]``) is the default combiner's."""
    raw = dict(raw)
    table = raw.get("combiner")
    if isinstance(table, dict) and "plugin" not in table:
        raw["combiner"] = {"plugin": DEFAULT_COMBINER, **table}
    try:
        spec = EnsembleSpec.model_validate(raw)
    except ValidationError as e:
        raise FerError(f"{source}: {validation_message(e, raw, EnsembleSpec)}") from None
    try:
        registry = get_registry()
        checked = registry.validate("ensembler", spec.combiner.spec(), "combiner")
        registry.build("ensembler", checked, "combiner")  # what only the factory checks (cheap: nothing fitted)
    except FerError as e:
        raise FerError(f"{source}: {e}") from None
    spec.combiner = RecipeTable.model_validate(checked)
    return spec


def spec_from_command_line(sources: Sequence[Path], overrides: Sequence[str], combiner: str | None = None,
                           fit_split: str | None = None, max_size_mb: float | None = None) -> EnsembleSpec:
    """`fer ensemble`'s arguments: members (or one recipe file), then ``--combiner`` (a new
    table unless it names the recipe's own combiner), then ``-o`` (merged into that table),
    then ``--fit-split`` and ``--max-size-mb``."""
    tomls = [s for s in sources if Path(s).suffix == ".toml"]
    if tomls and len(sources) > 1:
        raise FerError("SOURCES: give member directories, or one ensemble recipe (.toml), not both")
    if tomls:
        raw, where = read_toml(Path(tomls[0])), str(tomls[0])
    else:
        raw, where = {"members": [str(s) for s in sources]}, "command line"
    if combiner is not None:
        table = raw.get("combiner")
        if not (isinstance(table, dict) and table.get("plugin", DEFAULT_COMBINER) == combiner):
            raw["combiner"] = {"plugin": combiner}
    raw = apply_overrides(raw, list(overrides))
    for key, value in (("fit_split", fit_split), ("max_size_mb", max_size_mb)):
        if value is not None:
            raw[key] = value
    return validate_spec(raw, where)


# ------------------------------------------------------------------ scores


def aligned_scores(member: Predictor, calibrated: np.ndarray, classes: Sequence[str], space: str) -> np.ndarray:
    """A member's calibrated logits as the combiner's inputs: probabilities (``space`` "probs")
    or the logits themselves, with columns re-ordered into the ensemble's class order."""
    scores = softmax(np.asarray(calibrated, dtype=np.float64)) if space == "probs" else np.asarray(calibrated)
    index = class_index(member.classes)
    return scores[:, [index[c.lower()] for c in classes]]


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))


def check_classes(members: Sequence[Predictor], names: Sequence[str], where: str = "members") -> list[str]:
    """The ensemble's classes (the first member's); every member must know the same set."""
    classes = list(members[0].classes)
    for name, m in zip(names, members):
        if sorted(c.lower() for c in m.classes) != sorted(c.lower() for c in classes) \
                or len(class_index(m.classes)) != len(m.classes):
            raise FerError(f"{where}: '{name}' has classes {list(m.classes)}, '{names[0]}' has {classes}")
    return classes


# ------------------------------------------------------------------ the artifact


class _MemberEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source: str = ""
    #: relative to the ensemble directory ("dir" in artifacts of fer 0.1)
    path: str = Field(validation_alias=AliasChoices("path", "dir"))


class _CombinerEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)
    state: Any = None


class EnsembleFile(BaseModel):
    """What ``ensemble.json`` holds."""

    model_config = ConfigDict(extra="ignore")
    name: str = "ensemble"
    classes: list[str] = Field(min_length=1)
    members: list[_MemberEntry] = Field(min_length=1)
    fit_split: str = "val"
    combiner: _CombinerEntry
    size_mb: float | None = None


def read_ensemble_file(file: Path) -> EnsembleFile:
    """``ensemble.json``, or a FerError naming it."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FerError(f"{file}: not valid JSON ({e}); rebuild the ensemble with `fer ensemble`") from None
    except OSError as e:
        raise FerError(f"{file}: cannot be read ({e.strerror or e})") from None
    try:
        return EnsembleFile.model_validate(raw)
    except ValidationError as e:
        raise FerError(f"{file}: not an ensemble written by `fer ensemble`: {validation_message(e, raw, EnsembleFile)}; "
                       "rebuild it with `fer ensemble`") from None


class EnsemblePredictor:
    """An ensemble directory as one Predictor: the log of the combined probabilities is both its
    raw and its calibrated emotion logits (each member's own calibration is applied before
    combining). Its recipe, registry and preprocessing are its first member's."""

    au_names: list[str]

    def __init__(self, path: Path, overrides: Sequence[str] = (), device: str | None = None) -> None:
        file = Path(path) / ENSEMBLE_FILE
        meta = read_ensemble_file(file)
        self.path, self.name, self.meta = Path(path), meta.name, meta
        self.members: list[Predictor] = [load_predictor(self.path / m.path, list(overrides), device)
                                         for m in meta.members]
        first = self.members[0]
        self.classes = list(meta.classes)
        try:
            check_classes([_Named(self.classes), *self.members], [ENSEMBLE_FILE, *(m.path for m in meta.members)],
                          str(file))
        except FerError as e:
            raise FerError(f"{e}; the artifact is inconsistent, rebuild it with `fer ensemble`") from None
        self.au_names = []
        self.preprocessing: Preprocessing = first.preprocessing
        self.recipe, self.registry, self.device = first.recipe, first.registry, first.device
        c = meta.combiner
        try:
            self.combiner = self.registry.build("ensembler", {"plugin": c.plugin, **c.params}, "combiner")
            self.combiner.load_state(c.state)
        except FerError as e:
            raise FerError(f"{file}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise FerError(f"{file}: the state of combiner '{c.plugin}' is unreadable ({type(e).__name__}: {e}); "
                           "rebuild the ensemble with `fer ensemble`") from None

    def combine(self, calibrated: Sequence[np.ndarray]) -> np.ndarray:
        """N×C combined probabilities from each member's calibrated logits (member class order)."""
        space = self.combiner.space
        return self.combiner([aligned_scores(m, z, self.classes, space) for m, z in zip(self.members, calibrated)])

    def predict(self, samples: Sequence[Sample], tta: TestTimeAugmentation | None = None,
                batch_size: int | None = None) -> dict[str, np.ndarray]:
        if tta is not None:
            raise FerError("--tta: not supported for ensembles (evaluate the members with --tta)")
        preds = [m.predict(samples, batch_size=batch_size) for m in self.members]
        logp = _log(self.combine([p["calibrated.emotion"] for p in preds]))
        out = {"logits.emotion": logp, "calibrated.emotion": logp}
        if "label" in preds[0]:
            out["label"] = preds[0]["label"]
        return out

    @torch.no_grad()
    def logits(self, images: torch.Tensor, pre: Preprocessing, calibrated: bool = True) -> torch.Tensor:
        """Log of the combined probabilities of a batch prepared with preprocessing ``pre`` (each
        member adapts it to its own), ensemble class order: e.g. a distillation teacher. The
        members' calibration is always applied (the combiner was fitted on calibrated scores)."""
        scores = [m.logits(images, pre).float().cpu().numpy() for m in self.members]
        return torch.as_tensor(_log(self.combine(scores)), dtype=torch.float32, device=images.device)

    def size_mb(self) -> float:
        return sum(m.size_mb() for m in self.members)

    def describe(self) -> dict[str, Any]:
        return {"kind": "ensemble", "path": str(self.path), "members": len(self.members),
                "combiner": self.meta.combiner.plugin, "fit_split": self.meta.fit_split,
                "calibration": f"each member's own, then combiner '{self.meta.combiner.plugin}'"}


class _Named:
    """Stands for the class list stored in ensemble.json when members are checked against it."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes


def load_ensemble(path: Path, overrides: list[str], device: str | None, /) -> EnsemblePredictor | None:
    """A directory with an ``ensemble.json`` (written by `fer ensemble`), or that file itself."""
    path = Path(path)
    if path.name == ENSEMBLE_FILE and path.is_file():
        path = path.parent
    if not (path / ENSEMBLE_FILE).is_file():
        return None
    return EnsemblePredictor(path, overrides, device)


# ------------------------------------------------------------------ building


def _member_dir_name(i: int, source: Path) -> str:
    return f"{i}_{source.resolve().name}"


def _copy_member(src: Path, dst: Path) -> None:
    """A run: its recipe and best checkpoint (all a Predictor reads; a packed run's safetensors
    + JSON); a shipped model by its name: its directory; anything else: as it is."""
    src = shipped_model(src) or src
    if RunDir(src).is_run():
        dst.mkdir(parents=True)
        packed = not (src / RunDir.BEST).is_file() and (src / RunDir.PACKED_WEIGHTS).is_file()
        for name in (RunDir.RECIPE, *((RunDir.PACKED_WEIGHTS, RunDir.PACKED_META) if packed else (RunDir.BEST,))):
            shutil.copy2(src / name, dst / name)
    elif src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _measure(member: Predictor, samples: Sequence[Sample]) -> tuple[np.ndarray, float]:
    """(calibrated logits, batched ms per image)."""
    t0 = time.perf_counter()
    p = member.predict(samples)
    return p["calibrated.emotion"], 1000 * (time.perf_counter() - t0) / max(len(samples), 1)


def build(spec: EnsembleSpec, out: Path) -> dict[str, Any]:
    """Load the members, fit the combiner on ``spec.fit_split``, write the artifact to ``out``;
    returns what metrics.json holds (figures on the fit split: in-sample for the ensemble)."""
    out = Path(out)
    guard_not_test(spec.fit_split, "ensemble weights are fitted", option="fit_split")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FerError(f"{out}: exists and is not an empty directory; choose another --out")
    members = [load_predictor(Path(m)) for m in spec.members]
    classes = check_classes(members, spec.members)
    sizes = [m.size_mb() for m in members]
    size = sum(sizes)
    if size > spec.max_size_mb:
        raise FerError(f"max_size_mb: the members' weights total {size:.1f} MB, over the limit of {spec.max_size_mb} MB")
    first = members[0]
    combiner = first.registry.build("ensembler", spec.combiner.spec(), "combiner")
    split, samples = split_samples(first, spec.fit_split)
    if not samples:
        raise FerError(f"fit_split: split '{split}' has no images to fit the combiner on")
    labels = np.array([s.label for s in samples])
    per_model, member_reports = [], []
    for name, m, mb in zip(spec.members, members, sizes):
        calibrated, ms = _measure(m, samples)
        scores = aligned_scores(m, calibrated, classes, combiner.space)
        per_model.append(scores)
        probs = scores if combiner.space == "probs" else softmax(scores)
        rep = classification_metrics(labels, probs, classes)
        member_reports.append({"run": name, "kind": m.describe().get("kind", "?"), "accuracy": rep["accuracy"],
                               "macro_f1": rep["macro_f1"], "ece": reliability(probs, labels)["ece"], "size_mb": mb,
                               "batched_ms_per_image": ms, "single_image_ms": single_image_latency_ms(m, samples)})
    combiner.fit(per_model, labels)
    probs = combiner(per_model)
    report = classification_metrics(labels, probs, classes)
    report["ece"] = reliability(probs, labels)["ece"]
    report["size_mb"] = size
    report["batched_ms_per_image"] = sum(m["batched_ms_per_image"] for m in member_reports)
    report["single_image_ms"] = sum(m["single_image_ms"] for m in member_reports)
    report["members"] = member_reports
    report["split"] = split
    report["in_sample"] = True  # the combiner was fitted on this very split
    stored = {"plugin": spec.combiner.plugin, "params": spec.combiner.params(), "state": combiner.state()}
    report["combiner"] = stored
    # write into a temporary directory, then move it into place: no half-written artifact
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        entries = []
        for i, (name, m) in enumerate(zip(spec.members, members)):
            rel = Path("members") / _member_dir_name(i, Path(m.path))
            _copy_member(Path(m.path), tmp / rel)
            entries.append({"source": str(Path(name).resolve()), "path": rel.as_posix()})
        atomic_write_json(tmp / ENSEMBLE_FILE, {
            "name": spec.name, "classes": classes, "members": entries, "fit_split": split,
            "combiner": stored, "size_mb": size})
        atomic_write_text(tmp / "ensemble.toml", dump_toml(spec.model_dump(mode="json")))
        atomic_write_json(tmp / "metrics.json", report)
        if out.exists():
            out.rmdir()  # only an empty directory may be replaced
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _state_text(state: Any, members: Sequence[str]) -> str:
    """A combiner's fitted state, readable: per-member weights by name, scalars and short lists
    in full, matrices by their shape (they are in ensemble.json)."""
    if not isinstance(state, dict):
        return repr(state)
    parts = []
    for key, value in state.items():
        if key == "weights" and isinstance(value, list) and len(value) == len(members):
            parts.append("weights " + ", ".join(f"{Path(m).name} {float(w):.4f}" for m, w in zip(members, value)))
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        elif isinstance(value, list) and value and isinstance(value[0], list):
            parts.append(f"{key} {len(value)}×{len(value[0])} matrix")
        elif isinstance(value, list):
            parts.append(f"{key} [" + ", ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in value) + "]")
        else:
            parts.append(f"{key} {value}")
    return "; ".join(parts) or "(no state)"


def print_report(report: dict[str, Any], spec: EnsembleSpec, out: Path) -> None:
    split = report["split"]
    in_sample = f"in-sample (fitted on '{split}')"
    metrics_tables(report, title=f"ensemble of {len(spec.members)} on '{split}', in-sample")
    table = Table(title=f"members and ensemble on '{split}'")
    table.add_column("member", overflow="fold")
    for col in ("accuracy", "macro-F1", "ECE", "MB", "ms/img (batch)", "ms/img (single)"):
        table.add_column(col, justify="right")
    ens = {"run": "ensemble", **{k: report[k] for k in ("accuracy", "macro_f1", "ece", "size_mb",
                                                        "batched_ms_per_image", "single_image_ms")}}
    for m in report["members"] + [ens]:
        table.add_row(m["run"], f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['ece']:.4f}", f"{m['size_mb']:.1f}",
                      f"{m['batched_ms_per_image']:.2f}", f"{m['single_image_ms']:.1f}")
    stdout.print(table)
    c = report["combiner"]
    params = ", ".join(f"{k}={v!r}" for k, v in c["params"].items())
    line = dict(markup=False, highlight=False, soft_wrap=True)
    stdout.print(f"combiner {c['plugin']} ({params}) fitted on '{split}': {_state_text(c['state'], spec.members)}",
                 **line)
    stdout.print(f"note: the ensemble's figures above are {in_sample}: measure it on held-out data with "
                 f"`fer eval {out} --split SPLIT`", **line)
    stdout.print(f"ensemble written to {out} ({report['size_mb']:.1f} MB of weights)", **line)


# ------------------------------------------------------------------ hooks


@hookimpl
def register_artifacts(register):
    register("ensemble", load_ensemble)


@hookimpl
def validate_recipe(raw, source):
    """Ensemble recipes are those with a ``members`` key."""
    if not isinstance(raw, dict) or "members" not in raw:
        return None
    return validate_spec(raw, source).model_dump(mode="json")


@hookimpl
def register_commands(cli):
    @cli.command("ensemble", epilog="Examples: fer ensemble runs/a runs/b --out runs/ens ;  "
                                    "fer ensemble recipes/ensemble.toml --out runs/ens -o combiner.weights=[0.6,0.4]")
    def ensemble_(
        sources: Annotated[list[Path], typer.Argument(help="Members (run or ensemble directories, artifacts), "
                                                           "or one ensemble recipe (.toml).", show_default=False)],
        out: Annotated[Path, typer.Option("--out", help="Directory for the ensemble (must not exist or be empty).")],
        combiner: Annotated[Optional[str], typer.Option("--combiner",
                                                        help="Ensembler plugin: average, stacking, ...")] = None,
        fit_split: Annotated[Optional[str], typer.Option("--fit-split",
                                                         help="Split to fit the combiner on (default val; never "
                                                              "test).")] = None,
        max_size_mb: Annotated[Optional[float], typer.Option("--max-size-mb",
                                                             help="Refuse ensembles larger than this (default "
                                                                  "500).")] = None,
        override: Overrides = None,
    ) -> None:
        """Combine trained models (classes matched by name) into a reusable ensemble artifact."""
        spec = spec_from_command_line(sources, override or [], combiner, fit_split, max_size_mb)
        report = build(spec, out)
        print_report(report, spec, out)
