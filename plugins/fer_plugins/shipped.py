"""Trained models installed with the package (``default``), and `fer pack`, which makes one from a run.

A *packed run* is a run directory reduced to what inference needs, with no pickle in it:

    recipe.toml         the resolved training recipe (as in every run)
    model.safetensors   the best checkpoint's weights (fp16 with ``--half``: half the size)
    model.json          the rest of the checkpoint: classes, AU names, preprocessing, calibration
    metrics.json        the validation figures the model was selected on, history.json its curves
    card.json           where it came from: the source run, its training time and device, size

Every command that takes a run directory takes a packed one (``RunDir.load_best`` reads either).
A package ships models by registering their directories by name (hook ``register_shipped_models``);
this plugin registers each packed run under ``fer_plugins/models/`` by its folder name, so
``fer eval default``, ``fer report default``, ``fer export default`` and ``fer predict photo.jpg``
use ``fer_plugins/models/default`` right after ``pip install`` (docs/predict.md says how it was
trained and what it scores).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Callable

import torch
import typer

from fer_core.api import FerError, RunArgument, RunDir, RunPredictor, hookimpl, stdout

MODELS = Path(__file__).parent / "models"
#: what of a best checkpoint an inference needs besides the weights (all JSON-able)
META_KEYS = ("format_version", "classes", "au_names", "task_sizes", "preprocessing", "calibration", "temperature",
             "epoch")
#: files of the source run that travel with the model (the figures it was selected on)
COPIED = (RunDir.RECIPE, RunDir.METRICS, RunDir.HISTORY, RunDir.CONFUSION)
CARD = "card.json"


def _directory(path: Path) -> Callable[[], Path]:
    return lambda: path


@hookimpl
def register_shipped_models(register):
    if MODELS.is_dir():
        for d in sorted(p for p in MODELS.iterdir() if RunDir(p).is_run()):
            register(d.name, _directory(d))


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FerError(f"--out: '{out}' exists and is not an empty directory; choose a new one")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise FerError(f"--out: cannot create '{out}': '{blocker}' is a file, not a directory")


def pack(run_dir: Path | str, out: Path, half: bool = False) -> dict[str, Any]:
    """Write ``out`` as a packed copy of the run's best checkpoint; return its card. The packed
    model is reloaded and compared with the run on a random batch before it is kept."""
    from safetensors.torch import save_file

    _check_out(out)
    source = RunPredictor(run_dir, device="cpu")
    rd = RunDir(source.path)
    ckpt = rd.load_best()
    weights = {k: (v.half() if half and v.is_floating_point() else v).detach().clone().contiguous()
               for k, v in ckpt.pop("model").items()}
    meta = {k: ckpt[k] for k in META_KEYS if k in ckpt}
    try:
        meta_text = json.dumps(meta, indent=2) + "\n"
    except TypeError as e:
        raise FerError(f"{rd.best_file()}: checkpoint metadata is not JSON-able ({e}); cannot pack it") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(weights, tmp / RunDir.PACKED_WEIGHTS, metadata={"format": "fer packed run", "classes": json.dumps(meta["classes"])})
        (tmp / RunDir.PACKED_META).write_text(meta_text, encoding="utf-8")
        for name in COPIED:
            if (rd / name).is_file():
                shutil.copyfile(rd / name, tmp / name)
        delta = _parity(source, tmp)
        tolerance = 5e-2 if half else 1e-4  # fp16 weights round each to ~3 significant digits
        if delta > tolerance:
            raise FerError(f"{run_dir}: the packed model's logits differ from the run's by {delta:.2g} "
                           f"(> {tolerance:g}); not written")
        status, metrics = rd.status(), rd.read_json(RunDir.METRICS, {}) or {}
        card = {
            "source": str(source.path), "packed": dt.datetime.now().isoformat(timespec="seconds"),
            "weights": "float16" if half else "float32", "size_mb": round((tmp / RunDir.PACKED_WEIGHTS).stat().st_size / 2**20, 2),
            "parameters": sum(v.numel() for v in weights.values()), "max_abs_logit_delta": delta,
            "trained": {k: status.get(k) for k in ("device", "precision", "started", "ended")},
            "validation": {k: metrics.get(k) for k in ("split", "accuracy", "macro_f1", "balanced_accuracy", "best_epoch")
                           if k in metrics},
        }
        (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


@torch.no_grad()
def _parity(source: RunPredictor, packed_dir: Path) -> float:
    """max |Δ logits| of the packed model against the run on a seeded random batch."""
    packed = RunPredictor(packed_dir, device="cpu")
    pre = source.preprocessing
    x = torch.randn(4, pre.channels, *pre.input_size, generator=torch.Generator().manual_seed(0))
    return float((source.logits(x, pre, calibrated=False) - packed.logits(x, pre, calibrated=False)).abs().max())


@hookimpl
def register_commands(cli):
    @cli.command("pack", epilog="Examples: fer pack runs/best --out models/mine ;  fer pack runs/best --out "
                                "plugins/fer_plugins/models/default --half   (the model `default` names)")
    def pack_(
        run_dir: RunArgument,
        out: Annotated[Path, typer.Option("--out", help="New directory for the packed model.", show_default=False)],
        half: Annotated[bool, typer.Option("--half", help="Store the weights as float16 (half the size; they are "
                                                          "computed in float32 again when loaded).")] = False,
    ) -> None:
        """Pack a run's best checkpoint for shipping: safetensors weights + JSON, no pickle; usable
        wherever a run directory is (fer eval/report/export/predict)."""
        card = pack(run_dir, out, half)
        val = card["validation"]
        figures = ", ".join(f"{k} {val[k]:.4f}" for k in ("accuracy", "macro_f1") if isinstance(val.get(k), float))
        stdout.print(f"packed {run_dir} → {out}: {card['size_mb']} MB ({card['weights']}), max |Δ logits| "
                     f"{card['max_abs_logit_delta']:.2g}" + (f"; val {figures}" if figures else ""),
                     markup=False, highlight=False, soft_wrap=True)
