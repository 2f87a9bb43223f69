"""`fer zeroshot`: a run directory without training, so that `fer eval`, `fer report`, ensembles
and every other consumer of a run work on a zero-shot Vision-LLM exactly as on a trained model.

`fer run` needs at least one epoch and something to train; a zero-shot classifier has neither.
This command builds the recipe's model (a ``llava`` backbone in mode ``likelihood`` and the
``answer_scores`` head: logits = the class names' log-likelihoods), fills in ``answers`` from the
dataset's class names when the recipe leaves them empty (a table {class: answer} is put in class
order), scores the validation split, fits the recipe's calibrator on it (in-sample, like `fer run`)
and writes what `fer run` writes: recipe.toml (the answers included), best.pt (the heads and the
adapters, none here, plus the reference to the base directory), metrics.json, history.json (empty),
the confusion matrix and run.json.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer
from torch import nn

from fer_core.api import (FerError, Overrides, RunArgument, RunDir, RunPredictor, apply_overrides, autocast,
                          confusion_matrix_png, dump_toml, eval_loader, evaluate_predictions, fit_calibrator,
                          get_registry, load_predictor, metrics_tables, read_toml, resolve_device, resolve_precision,
                          resolved, split_samples, stdout, validate)

from .backbone import LlavaBackbone, resolve_answers
from .components import export_adapters


class _Model(nn.Module):
    """backbone + named heads, with FerModel's state-dict layout (``backbone.…``, ``heads.<task>.…``)."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbone, self.heads = backbone, nn.ModuleDict(heads)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(images)
        return {k: h(f) for k, h in self.heads.items()}


class _Scored:
    """What split_samples / evaluate_predictions read of a Predictor, before best.pt exists."""

    def __init__(self, recipe: Any, registry: Any, classes: list[str], au_names: list[str], path: Path) -> None:
        self.recipe, self.registry, self.classes, self.au_names, self.path = recipe, registry, classes, au_names, path

    def describe(self) -> dict[str, Any]:
        return {"kind": "run", "path": str(self.path), "calibration": self.recipe.calibration.plugin, "zero_shot": True}


def _out_dir(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "zeroshot"
    for n in range(1, 1000):
        out = Path("runs") / (f"{safe}-{stamp}" + (f"-{n}" if n > 1 else ""))
        if not out.exists():
            return out
    raise FerError(f"runs/: could not choose a new run directory for '{safe}'")


def zero_shot_run(recipe_path: Path, overrides: list[str], out: Path | None) -> tuple[Path, dict[str, Any]]:
    raw = apply_overrides(read_toml(recipe_path), overrides)
    recipe = validate(raw, str(recipe_path))
    bb = recipe.model.backbone
    emotion = recipe.model.heads["emotion"]
    if bb.plugin != "llava" or bb.params().get("mode") != "likelihood" or emotion.plugin != "answer_scores":
        raise FerError(f"{recipe_path}: `fer zeroshot` scores class names: it needs model.backbone.plugin = \"llava\" "
                       "with mode = \"likelihood\" and model.heads.emotion.plugin = \"answer_scores\" (got "
                       f"'{bb.plugin}', mode {bb.params().get('mode')!r}, head '{emotion.plugin}')")
    reg = get_registry(recipe.plugins.disable)
    source = reg.build("dataset", recipe.data.spec(), "data")
    classes, au_names = list(source.classes), list(source.au_names)
    # the answers in the dataset's class order, written into the run's recipe (RunPredictor rebuilds from it)
    raw = copy.deepcopy(raw)
    answers = resolve_answers(bb.params().get("answers") or [], classes)
    raw.setdefault("model", {}).setdefault("backbone", {})["answers"] = answers
    recipe = validate(raw, str(recipe_path))
    rd = RunDir(out or _out_dir(recipe.name))
    if rd.is_run() or (rd / RunDir.BEST).exists():
        raise FerError(f"{rd}: already holds a run; choose another --out")
    with rd.lock():
        backbone = reg.build("backbone", recipe.model.backbone.spec(), "model.backbone")
        sizes = {"emotion": len(classes), **({"au": len(au_names)} if au_names else {})}
        heads = {}
        for name, spec in recipe.model.heads.items():
            if name not in sizes:
                raise FerError(f"model.heads.{name}: no such task; available: {', '.join(sizes)}")
            heads[name] = reg.build("head", spec.spec(), f"model.heads.{name}", backbone.feature_dim, sizes[name])
        model = _Model(backbone, heads)
        t = recipe.train
        device = resolve_device(t.device)
        precision = resolve_precision(t.precision, device)
        model.to(device).eval()
        scored = _Scored(recipe, reg, classes, au_names, rd.path)
        split, samples = split_samples(scored, recipe.data.val_split)
        pre = backbone.preprocessing
        loader = eval_loader(samples, pre, len(au_names), t.eval_batch_size or 2 * t.batch_size, 0, False)
        chunks: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for batch in loader:
                with autocast(device, precision):
                    outputs = model(batch["image"].to(device))
                for k, v in outputs.items():
                    chunks.setdefault(f"logits.{k}", []).append(v.float().cpu().numpy())
                for k in ("label", "au", "au_mask"):
                    if k in batch:
                        chunks.setdefault(k, []).append(batch[k].numpy())
        pred = {k: np.concatenate(v) for k, v in chunks.items()}
        cal, stored = fit_calibrator(recipe, reg, pred["logits.emotion"], pred["label"])
        pred["calibrated.emotion"] = cal(pred["logits.emotion"])
        report = evaluate_predictions(scored, pred)
        report["calibration"].update({"calibrator": stored["plugin"], "state": stored["state"], "split": split,
                                      "in_sample": True})
        final = {"split": split, **report, "best_epoch": 0, "epochs_run": 0, "monitor": t.monitor, "zero_shot": True}
        resolved_recipe = resolved(recipe)
        rd.write_text(RunDir.RECIPE, dump_toml(resolved_recipe))
        rd.save(RunDir.BEST, {"classes": classes, "au_names": au_names, "preprocessing": pre.to_dict(),
                              "recipe": resolved_recipe, "task_sizes": {k: sizes[k] for k in heads},
                              "model": model.state_dict(), "epoch": 0, "calibration": stored})
        rd.write_json(RunDir.METRICS, final)
        rd.write_json(RunDir.HISTORY, [])
        confusion_matrix_png(final["confusion_matrix"], final["classes"], rd / RunDir.CONFUSION,
                             title=f"{recipe.name}: zero-shot on '{split}'")
        rd.write_status(status="finished", zero_shot=True, device=str(device), precision=precision.name,
                        ended=dt.datetime.now().isoformat(timespec="seconds"))
    return rd.path, final


def register(cli: Any) -> None:
    @cli.command(epilog="Example: fer zeroshot recipes/llava_zeroshot_rafce.toml -o data.root=/data/RAF-CE "
                        "-o model.backbone.model_dir=/models/llava-1.5-7b-hf --out runs/llava0")
    def zeroshot(
        recipe: Annotated[Path, typer.Argument(help="Recipe TOML file (llava backbone, mode likelihood).")],
        override: Overrides = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<name>-<time>).")] = None,
    ) -> None:
        """Zero-shot classification by the likelihood of each class name: a run directory, no training."""
        out_dir, final = zero_shot_run(recipe, override or [], out)
        metrics_tables(final, title=f"zero-shot on '{final['split']}'")
        stdout.print(f"run directory: {out_dir}", markup=False, highlight=False)

    @cli.command("llava-adapters", epilog="Example: fer llava-adapters runs/llava-lora --out adapters/rafce")
    def llava_adapters(
        run_dir: RunArgument,
        out: Annotated[Optional[Path], typer.Option("--out", help="Directory (default <run>/adapters).")] = None,
    ) -> None:
        """Write a llava run's LoRA adapters (peft safetensors) and heads, referring to the base directory."""
        pred = load_predictor(run_dir)
        backbone = getattr(getattr(pred, "model", None), "backbone", None)
        if not isinstance(pred, RunPredictor) or not isinstance(backbone, LlavaBackbone):
            raise FerError(f"{run_dir}: not a run of the llava backbone")
        path = export_adapters(backbone, pred.model.heads, out or Path(run_dir) / "adapters", list(pred.classes))
        stdout.print(f"wrote {path}", markup=False, highlight=False)
