"""Using a finished run: load its best checkpoint (with the preprocessing, classes and
temperature stored in it), pick samples of a split, predict, evaluate. `fer eval`, ensembles,
distillation teachers and reports all load runs through here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import time
from typing import Any, Sequence

import numpy as np
import torch

from . import checkpoint
from .build import build_model, build_source, build_splits, eval_loader
from .calibration import calibration_report
from .data import check_images
from .engine import BEST, metrics_from_predictions, predict, softmax
from .errors import FerError
from .hardware import Precision, resolve_device, resolve_precision
from .interfaces import Preprocessing, Sample, TestTimeAugmentation
from .model import FerModel
from .recipe import Recipe, apply_overrides, read_toml, validate
from .registry import Registry, get_registry

RECIPE_FILE = "recipe.toml"


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Recipe
    registry: Registry
    model: FerModel
    preprocessing: Preprocessing
    classes: list[str]
    au_names: list[str]
    temperature: float
    device: torch.device
    precision: Precision

    def loader(self, samples: Sequence[Sample], batch_size: int | None = None):
        t = self.recipe.train
        return eval_loader(samples, self.preprocessing, len(self.au_names),
                           batch_size or t.eval_batch_size or 2 * t.batch_size, 0, False)


def load_run(run_dir: Path, overrides: Sequence[str] = (), device: str | None = None) -> LoadedRun:
    rpath = run_dir / RECIPE_FILE
    if not rpath.is_file():
        raise FerError(f"{run_dir}: not a fer run directory (no {RECIPE_FILE})")
    recipe = validate(apply_overrides(read_toml(rpath), list(overrides)), str(rpath))
    ckpt = checkpoint.load(run_dir / BEST)
    classes, au_names = list(ckpt["classes"]), list(ckpt.get("au_names", []))
    reg = get_registry(recipe.plugins.disable)
    backbone = recipe.model.backbone
    if "pretrained" in backbone.params():  # the weights come from the checkpoint, not a pretrained file
        setattr(backbone, "pretrained", False)
    model = build_model(recipe, reg, classes, au_names, ckpt.get("task_sizes"))
    model.load_state_dict(ckpt["model"])
    dev = resolve_device(device or recipe.train.device)
    model.to(dev).eval()
    return LoadedRun(run_dir, recipe, reg, model, Preprocessing.from_dict(ckpt["preprocessing"]), classes, au_names,
                     float(ckpt.get("temperature", 1.0)), dev, resolve_precision(recipe.train.precision, dev))


def map_classes(samples: Sequence[Sample], data_classes: list[str], model_classes: list[str], where: str) -> list[Sample]:
    """Re-index labels into the model's class order, matching names case-insensitively."""
    index = {c.lower(): i for i, c in enumerate(model_classes)}
    unknown = sorted({data_classes[s.label] for s in samples if data_classes[s.label].lower() not in index})
    if unknown:
        raise FerError(f"{where}: classes {unknown} are not among the model's classes {model_classes}")
    return [Sample(s.path, index[data_classes[s.label].lower()], s.au) for s in samples]


def split_samples(run: LoadedRun, split: str | None) -> tuple[str, list[Sample]]:
    """Samples of a split of the run's dataset (or of another one given by overrides), labelled
    in the run's class order."""
    recipe, reg = run.recipe, run.registry
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
    samples = map_classes(samples, source.classes, run.classes, f"data ({recipe.data.plugin})")
    if source.au_names != run.au_names:
        samples = [Sample(s.path, s.label, None) for s in samples]  # AU vocabularies differ: no AU metrics
    return split, samples


def run_predictions(run: LoadedRun, samples: Sequence[Sample],
                    tta: TestTimeAugmentation | None = None) -> dict[str, np.ndarray]:
    """Logits per head (and labels) over samples; with test-time augmentation the views'
    predictions are combined (see ViewAveraging)."""
    model = run.model if tta is None else ViewAveraging(run.model, tta)
    return predict(model, run.loader(samples), run.device, run.precision)


class ViewAveraging(torch.nn.Module):
    """A model whose outputs combine those of every TTA view. With ``combine = "probs"`` the
    emotion output is log(mean softmax) and the AU output logit(mean sigmoid), so that the usual
    softmax/sigmoid downstream yields the averaged probabilities; with "logits", the mean logit."""

    def __init__(self, model: torch.nn.Module, tta: TestTimeAugmentation) -> None:
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [self.model(v) for v in self.tta(images)]
        combined: dict[str, torch.Tensor] = {}
        for k in outs[0]:
            stack = torch.stack([o[k].float() for o in outs])
            if getattr(self.tta, "combine", "probs") == "logits":
                combined[k] = stack.mean(0)
            elif k == "emotion":
                combined[k] = (torch.logsumexp(torch.log_softmax(stack, -1), 0) - np.log(len(outs)))
            else:
                p = torch.sigmoid(stack).mean(0).clamp(1e-7, 1 - 1e-7)
                combined[k] = torch.log(p) - torch.log1p(-p)
        return combined


def evaluate_predictions(run: LoadedRun, pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """The metrics.json schema, with probabilities at the run's temperature and ECE before/after."""
    report = metrics_from_predictions(pred, run.classes, run.au_names)
    report["calibration"] = calibration_report(pred["logits.emotion"], pred["label"], run.temperature)
    return report


def build_tta(run: LoadedRun) -> TestTimeAugmentation:
    """The recipe's [tta] table, or the standard plugin's defaults (identity + mirror)."""
    spec = run.recipe.tta.spec() if run.recipe.tta is not None else {"plugin": "standard"}
    return run.registry.build("tta", spec, "tta", run.preprocessing)


def evaluate(run_dir: Path, split: str | None, overrides: Sequence[str], tta: bool = False) -> dict[str, Any]:
    run = load_run(run_dir, overrides)
    split, samples = split_samples(run, split)
    views = build_tta(run) if tta else None
    t0 = time.perf_counter()
    pred = run_predictions(run, samples, views)
    seconds = time.perf_counter() - t0
    report = evaluate_predictions(run, pred)
    n_views = len(views(torch.zeros(1, run.preprocessing.channels, *run.preprocessing.input_size))) if views else 1
    return {"split": split, "run": str(run_dir), **report,
            "inference": {"device": str(run.device), "precision": run.precision.name, "tta_views": n_views,
                          "batched_ms_per_image": 1000 * seconds / max(len(samples), 1)}}


def probabilities(run: LoadedRun, logits: np.ndarray) -> np.ndarray:
    """Calibrated class probabilities: softmax of logits / T."""
    return softmax(np.asarray(logits) / run.temperature)


def adapt_images(images: torch.Tensor, src: Preprocessing, dst: Preprocessing) -> torch.Tensor:
    """Re-express a normalised batch made for ``src`` preprocessing in ``dst``'s: undo src's
    mean/std, convert channels (gray → RGB by repetition, RGB → gray by luminance), resize
    bilinearly, apply dst's mean/std. Used when a teacher or an ensemble member was trained
    with another input size or normalisation than the images at hand."""
    dev, dt = images.device, images.dtype
    x = images.float() * torch.tensor(src.std, device=dev).view(1, -1, 1, 1) \
        + torch.tensor(src.mean, device=dev).view(1, -1, 1, 1)
    if src.channels == 1 and dst.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif src.channels == 3 and dst.channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(x.shape[-2:]) != tuple(dst.input_size):
        x = torch.nn.functional.interpolate(x, size=tuple(dst.input_size), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(dst.mean, device=dev).view(1, -1, 1, 1)) / torch.tensor(dst.std, device=dev).view(1, -1, 1, 1)
    return x.to(dt)


@torch.no_grad()
def run_logits(run: LoadedRun, images: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Emotion logits (in the run's class order) of a batch prepared with preprocessing ``pre``."""
    from .engine import autocast

    run.model.eval()
    x = adapt_images(images.to(run.device), pre, run.preprocessing) if pre != run.preprocessing else images.to(run.device)
    with autocast(run.device, run.precision):
        return run.model(x)["emotion"].float()


def single_image_latency_ms(run: LoadedRun, samples: Sequence[Sample], n: int = 32) -> float:
    """Mean wall time of one image end to end (decode, preprocess, forward) at batch size 1."""
    picked = list(samples[: n + 2])
    loader = run.loader(picked, batch_size=1)
    times = []
    for i, batch in enumerate(loader):
        t0 = time.perf_counter()
        predict(run.model, [batch], run.device, run.precision)
        if i >= 2:  # the first calls warm up allocators and kernels
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.mean(times)) if times else float("nan")


def calibrate(run_dir: Path, split: str | None = None) -> dict[str, float]:
    """Fit the temperature of an existing run on a validation split and store it in best.pt
    (and in metrics.json); for runs trained before calibration existed, or on other data."""
    from .calibration import fit_temperature

    run = load_run(run_dir)
    split = split or run.recipe.data.val_split
    if "test" in split.lower():
        raise FerError(f"--split: '{split}' looks like a test split; calibrate on validation data only")
    split, samples = split_samples(run, split)
    pred = run_predictions(run, samples)
    t = fit_temperature(pred["logits.emotion"], pred["label"])
    report = calibration_report(pred["logits.emotion"], pred["label"], t)
    ckpt = checkpoint.load(run_dir / BEST)
    ckpt["temperature"] = t
    checkpoint.save(run_dir / BEST, ckpt)
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        import json

        metrics = json.loads(metrics_path.read_text())
        metrics["calibration"] = {**report, "split": split}
        checkpoint.atomic_write_json(metrics_path, metrics)
    return {**report, "split": split}
