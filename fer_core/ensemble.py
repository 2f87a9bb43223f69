"""Ensembles of finished runs: `fer ensemble` builds a reusable artifact directory.

Members may differ in backbone, input size, channels and class order: each member sees the
images through its own stored preprocessing, and its scores are re-ordered into the ensemble's
class order by name. The combiner (an `ensembler` plugin) is fitted on the validation split —
never on a split named test — and its state is stored in `ensemble.json` next to copies of the
members' checkpoints, so the directory is self-contained.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .calibration import calibration_report, reliability
from .checkpoint import atomic_write_json, atomic_write_text
from .errors import FerError
from .inference import (LoadedRun, load_run, probabilities, run_logits, run_predictions,
                        single_image_latency_ms, split_samples)
from .interfaces import Preprocessing, Sample
from .metrics import classification_metrics
from .recipe import Component, dump_toml
from .registry import get_registry

ENSEMBLE_FILE = "ensemble.json"


class EnsembleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "ensemble"
    members: list[str] = Field(min_length=1)
    fit_split: str = "val"
    max_size_mb: float = Field(500.0, gt=0)
    combiner: Component = Field(default_factory=lambda: Component(plugin="average"))


def validate_spec(raw: dict[str, Any], source: str) -> EnsembleSpec:
    try:
        spec = EnsembleSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise FerError(f"{source}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    get_registry().get("ensembler", spec.combiner.plugin, "combiner").validate(spec.combiner.params(), "combiner")
    return spec


def _aligned(run: LoadedRun, scores: np.ndarray, classes: list[str]) -> np.ndarray:
    """Columns re-ordered from the member's class order into the ensemble's."""
    index = {c.lower(): i for i, c in enumerate(run.classes)}
    return scores[:, [index[c.lower()] for c in classes]]


def member_scores(run: LoadedRun, samples: Sequence[Sample], classes: list[str], space: str) -> tuple[np.ndarray, float]:
    """(N×C scores in ensemble class order, batched ms per image)."""
    t0 = time.perf_counter()
    pred = run_predictions(run, samples)
    ms = 1000 * (time.perf_counter() - t0) / max(len(samples), 1)
    logits = pred["logits.emotion"]
    scores = probabilities(run, logits) if space == "probs" else logits / run.temperature
    return _aligned(run, scores, classes), ms


def _size_mb(paths: Sequence[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def build(spec: EnsembleSpec, out: Path) -> dict[str, Any]:
    if "test" in spec.fit_split.lower():
        raise FerError(f"fit_split: '{spec.fit_split}' looks like a test split; ensembles are fitted on validation data only")
    if out.exists() and any(out.iterdir()):
        raise FerError(f"{out}: exists and is not empty; choose another --out")
    runs = [load_run(Path(m)) for m in spec.members]
    classes = runs[0].classes
    for m, r in zip(spec.members, runs):
        if sorted(c.lower() for c in r.classes) != sorted(c.lower() for c in classes):
            raise FerError(f"members: '{m}' has classes {r.classes}, '{spec.members[0]}' has {classes}")
    size = _size_mb([Path(m) / "best.pt" for m in spec.members])
    if size > spec.max_size_mb:
        raise FerError(f"max_size_mb: the members' checkpoints total {size:.1f} MB, over the limit of {spec.max_size_mb} MB")
    combiner = get_registry().build("ensembler", spec.combiner.spec(), "combiner")
    split, samples = split_samples(runs[0], spec.fit_split)
    labels = np.array([s.label for s in samples])
    per_model, member_reports = [], []
    for m, r in zip(spec.members, runs):
        scores, ms = member_scores(r, samples, classes, combiner.space)
        per_model.append(scores)
        probs = scores if combiner.space == "probs" else probabilities(r, scores * r.temperature)
        rep = classification_metrics(labels, probs, classes)
        member_reports.append({"run": m, "accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"],
                               "ece": reliability(probs, labels)["ece"], "size_mb": _size_mb([Path(m) / "best.pt"]),
                               "batched_ms_per_image": ms,
                               "single_image_ms": single_image_latency_ms(r, samples)})
    combiner.fit(per_model, labels)
    probs = combiner(per_model)
    report = classification_metrics(labels, probs, classes)
    report["ece"] = reliability(probs, labels)["ece"]
    report["size_mb"] = size
    report["batched_ms_per_image"] = sum(m["batched_ms_per_image"] for m in member_reports)
    report["single_image_ms"] = sum(m["single_image_ms"] for m in member_reports)
    report["members"] = member_reports
    report["split"] = split
    # write into a temporary directory, then move it into place: no half-written artifact
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        members = []
        for i, m in enumerate(spec.members):
            dst = tmp / "members" / f"{i}_{Path(m).resolve().name}"
            dst.mkdir(parents=True)
            for f in ("best.pt", "recipe.toml"):
                shutil.copy2(Path(m) / f, dst / f)
            members.append({"source": str(Path(m).resolve()), "dir": str(dst.relative_to(tmp))})
        atomic_write_json(tmp / ENSEMBLE_FILE, {
            "name": spec.name, "classes": classes, "members": members, "fit_split": split,
            "combiner": {"plugin": spec.combiner.plugin, "params": spec.combiner.params(), "state": combiner.state()},
            "size_mb": size})
        atomic_write_text(tmp / "ensemble.toml", dump_toml(spec.model_dump(mode="json")))
        atomic_write_json(tmp / "metrics.json", report)
        if out.exists():
            out.rmdir()  # only an empty directory may be replaced
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


class Ensemble:
    """A loaded ensemble artifact."""

    def __init__(self, path: Path, overrides: Sequence[str] = ()) -> None:
        meta = json.loads((path / ENSEMBLE_FILE).read_text())
        self.path, self.name, self.classes = path, meta["name"], meta["classes"]
        self.runs = [load_run(path / m["dir"], overrides) for m in meta["members"]]
        c = meta["combiner"]
        self.combiner = get_registry().build("ensembler", {"plugin": c["plugin"], **c["params"]}, "combiner")
        self.combiner.load_state(c["state"])

    def probabilities(self, samples: Sequence[Sample]) -> np.ndarray:
        return self.combiner([member_scores(r, samples, self.classes, self.combiner.space)[0] for r in self.runs])

    def logits(self, images: "torch.Tensor", pre: Preprocessing) -> "torch.Tensor":
        """Log of the combined probabilities for a batch prepared with preprocessing ``pre``
        (each member adapts it to its own), in the ensemble's class order: a distillation teacher."""
        per_model = []
        for r in self.runs:
            logits = run_logits(r, images, pre).cpu().numpy()
            scores = probabilities(r, logits) if self.combiner.space == "probs" else logits / r.temperature
            per_model.append(_aligned(r, scores, self.classes))
        probs = self.combiner(per_model)
        return torch.log(torch.as_tensor(probs, dtype=torch.float32).clamp_min(1e-12)).to(images.device)


def is_ensemble(path: Path) -> bool:
    return (path / ENSEMBLE_FILE).is_file()


def evaluate(path: Path, split: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    """`fer eval ENSEMBLE_DIR`: metrics of the combined probabilities on a split of the first
    member's dataset (or another one given by overrides)."""
    ens = Ensemble(path, overrides)
    split, samples = split_samples(ens.runs[0], split)
    t0 = time.perf_counter()
    probs = ens.probabilities(samples)
    ms = 1000 * (time.perf_counter() - t0) / max(len(samples), 1)
    labels = np.array([s.label for s in samples])
    report = classification_metrics(labels, probs, ens.classes)
    logp = np.log(np.clip(probs, 1e-12, 1))
    report["calibration"] = calibration_report(logp, labels, 1.0)
    return {"split": split, "run": str(path), **report,
            "inference": {"members": len(ens.runs), "batched_ms_per_image": ms}}
