"""Calibrators: temperature scaling (Guo et al. 2017, the default) and none; `fer calibrate`.

Temperature scaling divides the emotion logits by one scalar T > 0 fitted on the validation
split by minimising the negative log-likelihood: it never changes the argmax (accuracy and F1
are unchanged) and it lowers validation NLL by construction. T is bounded to [min_t, max_t]:
a degenerate validation set (a handful of images, all correct) would otherwise push T towards 0
or infinity and make every later probability 0/1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

import typer

from fer_core.api import (FerError, RunArgument, RunDir, RunPredictor, calibration_report, fit_calibrator,
                          guard_not_test, hookimpl, nll, split_samples, stdout)


class TemperatureScaling:
    def __init__(self, min_t: float, max_t: float, max_iter: int) -> None:
        self.min_t, self.max_t, self.max_iter = min_t, max_t, max_iter
        self.temperature = 1.0

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        """The T minimising NLL(logits / T), over log T with L-BFGS, clamped to the bounds."""
        z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=self.max_iter, line_search_fn="strong_wolfe")
        lo, hi = np.log(self.min_t), np.log(self.max_t)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.clamp(lo, hi).exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        t = float(np.clip(float(log_t.detach().exp()), self.min_t, self.max_t))
        # L-BFGS is a local method: never keep a T worse than no scaling
        self.temperature = t if np.isfinite(t) and nll(logits, labels, t) <= nll(logits, labels, 1.0) else 1.0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits) / self.temperature

    def state(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_state(self, state: dict[str, Any]) -> None:
        self.temperature = float(state.get("temperature", 1.0))


class NoCalibration:
    def fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        pass

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits)

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


def make_temperature(*, min_t: Annotated[float, Field(gt=0)] = 0.05, max_t: Annotated[float, Field(gt=0)] = 20.0,
                     max_iter: Annotated[int, Field(ge=1)] = 200) -> TemperatureScaling:
    """One temperature T in [min_t, max_t] fitted by NLL on validation logits."""
    if min_t >= max_t:
        raise FerError(f"calibration.min_t: must be below max_t ({min_t} ≥ {max_t})")
    return TemperatureScaling(min_t, max_t, max_iter)


def make_none() -> NoCalibration:
    """Report the model's own softmax probabilities."""
    return NoCalibration()


@hookimpl
def register_calibrators(register):
    register("temperature", make_temperature)
    register("none", make_none)


def calibrate_run(run_dir: Path, split: str | None = None) -> dict[str, Any]:
    """Fit the calibrator of an existing run on a validation split and store it in best.pt (and
    metrics.json): for runs trained before calibration existed, or on other data."""
    pred = RunPredictor(run_dir)
    if pred.shipped:
        raise FerError(f"{run_dir}: a shipped model is installed read-only; `fer pack {run_dir} --out DIR` "
                       "makes a copy you can recalibrate")
    split = split or pred.recipe.data.val_split
    guard_not_test(split, "calibrate")
    split, samples = split_samples(pred, split)
    p = pred.predict(samples)
    cal, stored = fit_calibrator(pred.recipe, pred.registry, p["logits.emotion"], p["label"])
    rd = RunDir(pred.path)
    rd.store_calibration(stored)
    report = {**calibration_report(p["logits.emotion"], cal(p["logits.emotion"]), p["label"]),
              "calibrator": stored["plugin"], "state": stored["state"], "split": split,
              "in_sample": split == pred.recipe.data.val_split}
    metrics = rd.read_json(RunDir.METRICS)
    if metrics is not None:
        metrics["calibration"] = report
        rd.write_json(RunDir.METRICS, metrics)
    return report


@hookimpl
def register_commands(cli):
    @cli.command(epilog="Example: fer calibrate runs/quickstart-20261201-120000")
    def calibrate(
        run_dir: RunArgument,
        split: Annotated[Optional[str], typer.Option("--split", help="Validation split to fit on (never test).")] = None,
    ) -> None:
        """Fit the run's calibrator on validation data and store it in the run's best.pt."""
        cal = calibrate_run(Path(run_dir), split)
        stdout.print(f"{run_dir}: {cal['calibrator']} {cal.get('state', {})} fitted on '{cal['split']}'; "
                     f"ECE {cal['ece']:.4f} → {cal['ece_calibrated']:.4f}; NLL {cal['nll']:.4f} → "
                     f"{cal['nll_calibrated']:.4f}", markup=False, highlight=False)
