"""Using a trained artifact: one ``Predictor`` for `fer eval`, reports, teachers, ensembles,
`fer predict` and exporters.

``load_predictor(path)`` opens a run directory (its best checkpoint, with the preprocessing,
classes and fitted calibrator stored in it) or anything an ``artifact`` plugin recognises (an
ensemble, an exported model). Every consumer then sees the same thing: samples or image
batches in, raw and calibrated emotion logits out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .build import build_model, build_source, build_splits, eval_loader
from .data import check_images
from .errors import FerError
from .hardware import Precision, autocast, resolve_device, resolve_precision, to_device
from .kinds import BY_NAME
from .interfaces import Calibrator, Predictor, Preprocessing, Sample, TestTimeAugmentation
from .metrics import ece, metrics_from_predictions, nll, softmax
from .model import FerModel
from .recipe import Recipe, apply_overrides, read_toml, validate
from .registry import Registry, get_registry
from .rundir import RunDir


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Iterable[dict[str, Any]], device: torch.device, precision: Precision,
            channels_last: bool = False) -> dict[str, np.ndarray]:
    """Logits of every head over a loader, plus the labels it carried (numpy, in loader order)."""
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        b = to_device(batch, device, channels_last)
        with autocast(device, precision):
            outputs = model(b["image"])
        for name, logits in outputs.items():
            chunks.setdefault(f"logits.{name}", []).append(logits.float().cpu().numpy())
        for key in ("label", "au", "au_mask", "index"):
            if key in batch:
                chunks.setdefault(key, []).append(batch[key].cpu().numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


def guard_not_test(split: str, what: str, option: str = "--split") -> None:
    """Nothing is fitted on a test split (temperatures, ensemble weights): one rule, one message."""
    if "test" in split.lower():
        raise FerError(f"{option}: '{split}' looks like a test split; {what} on validation data only")


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """Class name (case-insensitive) → position: how runs, datasets and ensembles are matched."""
    return {c.lower(): i for i, c in enumerate(classes)}


def map_classes(samples: Sequence[Sample], data_classes: list[str], model_classes: list[str], where: str) -> list[Sample]:
    """Re-index labels into the model's class order, matching names case-insensitively."""
    index = class_index(model_classes)
    unknown = sorted({data_classes[s.label] for s in samples if data_classes[s.label].lower() not in index})
    if unknown:
        raise FerError(f"{where}: classes {unknown} are not among the model's classes {model_classes}")
    return [Sample(s.path, index[data_classes[s.label].lower()], s.au) for s in samples]


def adapt_images(images: torch.Tensor, src: Preprocessing, dst: Preprocessing) -> torch.Tensor:
    """Re-express a normalised batch made for ``src`` preprocessing in ``dst``'s: undo src's
    mean/std, convert channels (gray → RGB by repetition, RGB → gray by luminance), resize
    bilinearly, apply dst's mean/std. For teachers and ensemble members trained on other inputs."""
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
            if self.tta.combine == "logits":
                combined[k] = stack.mean(0)
            elif k == "emotion":
                combined[k] = (torch.logsumexp(torch.log_softmax(stack, -1), 0) - np.log(len(outs)))
            else:
                p = torch.sigmoid(stack).mean(0).clamp(1e-7, 1 - 1e-7)
                combined[k] = torch.log(p) - torch.log1p(-p)
        return combined


def calibration_spec(ckpt: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The calibrator stored in a checkpoint (checkpoints of fer 0.1 stored a bare temperature)."""
    if "calibration" in ckpt:
        return ckpt["calibration"]
    if "temperature" in ckpt:
        return {"plugin": "temperature", "params": {}, "state": {"temperature": float(ckpt["temperature"])}}
    return {"plugin": recipe.calibration.plugin, "params": recipe.calibration.params(), "state": None}


def shipped_model(name: Path | str) -> Path | None:
    """The run directory a ``shipped_model`` plugin installed under this name (``default``), when
    ``name`` is such a name and not a path that exists."""
    if Path(name).exists() or Path(name).name != str(name):
        return None
    comp = get_registry().components["shipped_model"].get(str(name))
    return Path(comp.factory()) if comp is not None else None


class RunPredictor:
    """A finished run's best checkpoint as a Predictor (also a shipped model, by its name)."""

    def __init__(self, run_dir: Path | str, overrides: Sequence[str] = (), device: str | None = None) -> None:
        installed = shipped_model(run_dir)
        #: the name of a shipped model (its directory is read-only: outputs go elsewhere), else None
        self.shipped: str | None = str(run_dir) if installed else None
        run_dir = installed or run_dir
        rd = RunDir(run_dir).require_run()
        rpath = rd / RunDir.RECIPE
        self.path, self.name = Path(run_dir), self.shipped or Path(run_dir).name
        self.recipe = validate(apply_overrides(read_toml(rpath), list(overrides)), str(rpath))
        ckpt = rd.load_best()
        self.classes, self.au_names = list(ckpt["classes"]), list(ckpt.get("au_names", []))
        self.registry: Registry = get_registry(self.recipe.plugins.disable)
        backbone = self.recipe.model.backbone
        if "pretrained" in backbone.params():  # the weights come from the checkpoint, not a pretrained file
            setattr(backbone, "pretrained", False)
        self.model: FerModel = build_model(self.recipe, self.registry, self.classes, self.au_names, ckpt.get("task_sizes"))
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise FerError(f"{rd.best_file()}: the weights do not fit the recipe's model ({str(e).splitlines()[0]})") from None
        self.device = resolve_device(device or self.recipe.train.device)
        self.model.to(self.device).eval()
        self.precision = resolve_precision(self.recipe.train.precision, self.device)
        self.preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
        cal = calibration_spec(ckpt, self.recipe)
        self.calibration = cal
        self.calibrator: Calibrator = self.registry.build("calibrator", {"plugin": cal["plugin"], **cal.get("params", {})},
                                                          "calibration")
        if cal.get("state") is not None:
            self.calibrator.load_state(cal["state"])

    def loader(self, samples: Sequence[Sample], batch_size: int | None = None):
        t = self.recipe.train
        return eval_loader(samples, self.preprocessing, len(self.au_names),
                           batch_size or t.eval_batch_size or 2 * t.batch_size, 0, False)

    def predict(self, samples: Sequence[Sample], tta: TestTimeAugmentation | None = None,
                batch_size: int | None = None) -> dict[str, np.ndarray]:
        model = self.model if tta is None else ViewAveraging(self.model, tta)
        pred = predict(model, self.loader(samples, batch_size), self.device, self.precision)
        pred["calibrated.emotion"] = self.calibrator(pred["logits.emotion"])
        return pred

    @torch.no_grad()
    def logits(self, images: torch.Tensor, pre: Preprocessing, calibrated: bool = True) -> torch.Tensor:
        """Emotion logits (run's class order) of a batch prepared with preprocessing ``pre``;
        ``calibrated=False`` gives the raw ones (a distillation teacher: its T plays that role)."""
        self.model.eval()
        x = images.to(self.device)
        if pre != self.preprocessing:
            x = adapt_images(x, pre, self.preprocessing)
        with autocast(self.device, self.precision):
            raw = self.model(x)["emotion"].float()
        if not calibrated:
            return raw.to(images.device)
        return torch.as_tensor(self.calibrator(raw.cpu().numpy()), dtype=torch.float32, device=images.device)

    def size_mb(self) -> float:
        return RunDir(self.path).best_file().stat().st_size / 2**20

    def describe(self) -> dict[str, Any]:
        return {"kind": "run", "path": str(self.path), "calibration": self.calibration["plugin"],
                **({"shipped": self.shipped} if self.shipped else {})}


def load_predictor(path: Path | str, overrides: Sequence[str] = (), device: str | None = None) -> Predictor:
    """A run directory, or any artifact an ``artifact`` plugin recognises (ensembles, exports)."""
    path = Path(path)
    if RunDir(path).is_run() or shipped_model(path):
        return RunPredictor(path, overrides, device)
    reg = get_registry()
    for comp in reg.components["artifact"].values():
        found = comp.factory(path, list(overrides), device)
        if found is not None:
            return found
    if not path.exists():
        names = sorted(reg.components["shipped_model"])
        raise FerError(f"{path}: no such run directory or file (shipped models installed: "
                       f"{', '.join(names) if names else 'none'})")
    raise FerError(f"{path}: not a fer run directory (no {RunDir.RECIPE}) nor an artifact any plugin reads")


def split_samples(pred: Predictor, split: str | None) -> tuple[str, list[Sample]]:
    """Samples of a split of the predictor's dataset (or of another one given by overrides),
    labelled in the predictor's class order."""
    recipe, reg = pred.recipe, pred.registry
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
    samples = map_classes(samples, source.classes, pred.classes, f"data ({recipe.data.plugin})")
    if source.au_names != pred.au_names:
        samples = [Sample(s.path, s.label, None) for s in samples]  # AU vocabularies differ: no AU metrics
    return split, samples


def calibration_report(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"ece": ece(softmax(np.asarray(raw)), labels), "ece_calibrated": ece(softmax(np.asarray(calibrated)), labels),
            "nll": nll(raw, labels), "nll_calibrated": nll(calibrated, labels)}


def evaluate_predictions(pred: Predictor, p: dict[str, np.ndarray]) -> dict[str, Any]:
    """The metrics.json schema (calibrated probabilities) with ECE/NLL before and after calibration."""
    report = metrics_from_predictions(p, pred.classes, pred.au_names, emotion_key="calibrated.emotion")
    report["calibration"] = {**calibration_report(p["logits.emotion"], p["calibrated.emotion"], p["label"]),
                             **pred.describe()}
    return report


def build_tta(pred: Predictor) -> TestTimeAugmentation:
    """The recipe's [tta] table, or the default plugin's defaults (identity + mirror)."""
    spec = pred.recipe.tta.spec() if pred.recipe.tta is not None else {"plugin": BY_NAME["tta"].default}
    return pred.registry.build("tta", spec, "tta", pred.preprocessing)


def evaluate(path: Path, split: str | None, overrides: Sequence[str], tta: bool = False) -> dict[str, Any]:
    pred = load_predictor(path, overrides)
    split, samples = split_samples(pred, split)
    views = build_tta(pred) if tta else None
    t0 = time.perf_counter()
    p = pred.predict(samples, views)
    seconds = time.perf_counter() - t0
    report = evaluate_predictions(pred, p)
    n_views = len(views(torch.zeros(1, pred.preprocessing.channels, *pred.preprocessing.input_size))) if views else 1
    return {"split": split, "run": str(path), **report,
            "inference": {"device": str(pred.device), "tta_views": n_views, **pred.describe(),
                          "batched_ms_per_image": 1000 * seconds / max(len(samples), 1)}}


def single_image_latency_ms(pred: Predictor, samples: Sequence[Sample], n: int = 32) -> float:
    """Mean wall time of one image end to end (decode, preprocess, forward) at batch size 1."""
    picked = list(samples[: n + 2])
    times = []
    for i, s in enumerate(picked):
        t0 = time.perf_counter()
        pred.predict([s], batch_size=1)
        if i >= 2:  # the first calls warm up allocators and kernels
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.mean(times)) if times else float("nan")


def fit_calibrator(recipe: Recipe, registry: Registry, raw_logits: np.ndarray, labels: np.ndarray) -> tuple[Calibrator, dict[str, Any]]:
    """The recipe's calibrator fitted on validation logits, and what best.pt stores of it."""
    spec = recipe.calibration
    cal = registry.build("calibrator", spec.spec(), "calibration")
    cal.fit(raw_logits, labels)
    return cal, {"plugin": spec.plugin, "params": spec.params(), "state": cal.state()}
