"""Class-imbalance and regularising losses on the emotion head: focal, label smoothing and
class-weighted cross-entropy (inverse frequency or effective number of samples).

Every loss reads ``outputs["emotion"]`` (cast to float32: autocast may hand bf16 logits), uses
``batch["soft_label"]`` (B×C, rows summing to 1, e.g. from Mixup/CutMix) instead of
``batch["label"]`` when present, reduces over the batch with a mean and returns
``(total, {"emotion": total.detach()})``. Formulas: docs/techniques.md.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from fer_core.api import Batch, FerError, Outputs, TaskInfo, hookimpl, traits

#: lower bound of (1 - p) in the focal modulating factor: keeps the gradient of (1-p)^gamma
#: finite at p = 1 when gamma < 1 (the clamp's gradient is 0 there, so nothing leaks)
FOCAL_EPS = 1e-12


# --------------------------------------------------------------------------- class weights


def _fill_empty(w: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Classes without training images get the largest weight of the others (never inf/NaN);
    with no counts at all every class weighs 1."""
    have = counts > 0
    if not have.any():
        return np.ones_like(w)
    w = w.copy()
    w[~have] = w[have].max()
    return w


def _mean_one(w: np.ndarray) -> list[float]:
    return (w / w.mean()).tolist()


def inverse_frequency_weights(counts: list[int]) -> list[float]:
    """w_c = 1/n_c, normalised to mean 1 over classes; classes with n_c = 0 get max_c' w_c'."""
    n = np.asarray(counts, dtype=np.float64)
    w = np.where(n > 0, 1.0 / np.maximum(n, 1.0), 0.0)
    return _mean_one(_fill_empty(w, n))


def effective_number_weights(counts: list[int], beta: float) -> list[float]:
    """Cui et al. 2019: w_c = (1 - beta) / (1 - beta^n_c), normalised to mean 1 over classes;
    classes with n_c = 0 get max_c' w_c'. beta = 0 gives equal weights, beta → 1 tends to 1/n_c."""
    if not 0.0 <= beta < 1.0:
        raise FerError(f"loss.beta: must be in [0, 1) (got {beta})")
    n = np.asarray(counts, dtype=np.float64)
    if beta == 0.0:
        w = np.ones_like(n)
    else:
        # 1 - beta^n computed as -expm1(n log beta): accurate for beta close to 1
        denom = -np.expm1(np.maximum(n, 1.0) * math.log(beta))
        w = np.where(n > 0, (1.0 - beta) / denom, 0.0)
    return _mean_one(_fill_empty(w, n))


def _check_weights(values: list[float], task: TaskInfo, key: str, *, allow_zero: bool) -> torch.Tensor:
    if len(values) != len(task.classes):
        raise FerError(f"loss.{key}: {len(values)} weights given for {len(task.classes)} classes "
                       f"({', '.join(task.classes)})")
    bad = [v for v in values if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero)]
    if bad:
        need = "finite and >= 0" if allow_zero else "finite and > 0"
        raise FerError(f"loss.{key}: every weight must be {need} (got {bad[0]})")
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- losses


def _target(logits: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """The soft target (float32, B×C) when the batch carries one, else None (use hard labels)."""
    soft = batch.get("soft_label")
    if soft is None:
        return None
    soft = soft.to(device=logits.device, dtype=torch.float32)
    if soft.shape != logits.shape:
        raise FerError(f"batch soft_label has shape {tuple(soft.shape)}, the emotion logits {tuple(logits.shape)}")
    return soft


class _Loss:
    reweights_classes = False

    def per_sample(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, outputs: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = outputs["emotion"].float()
        total = self.per_sample(logits, batch).mean()
        return total, {"emotion": total.detach()}


class FocalLoss(_Loss):
    """-sum_c y_c alpha_c (1 - p_c)^gamma log p_c; with a hard label y this is
    -alpha_y (1 - p_y)^gamma log p_y (Lin et al. 2017). gamma = 0, no alpha: cross-entropy."""

    def __init__(self, gamma: float, alpha: torch.Tensor | None) -> None:
        self.gamma = gamma
        self.alpha = alpha
        self.reweights_classes = alpha is not None

    def _modulate(self, logp: torch.Tensor) -> torch.Tensor:
        if self.gamma == 0:
            return torch.ones_like(logp)
        # 1 - p = -expm1(log p): exact for p near 1, no exp(-ce) of huge values
        return (-torch.expm1(logp)).clamp(min=FOCAL_EPS).pow(self.gamma)

    def per_sample(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=1)
        alpha = self.alpha.to(logits.device) if self.alpha is not None else None
        soft = _target(logits, batch)
        if soft is None:
            y = batch["label"].to(logits.device).long()
            logp_t = logp.gather(1, y[:, None])[:, 0]
            per = -self._modulate(logp_t) * logp_t
            return per * alpha[y] if alpha is not None else per
        w = soft * alpha if alpha is not None else soft
        return -(w * self._modulate(logp) * logp).sum(dim=1)


class LabelSmoothingCE(_Loss):
    """Cross-entropy against (1 - s) y + s / C, y the one-hot (or soft) target: the same as
    ``F.cross_entropy(..., label_smoothing=s)``."""

    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing

    def per_sample(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        soft = _target(logits, batch)
        if soft is None:
            return F.cross_entropy(logits, batch["label"].to(logits.device).long(), reduction="none",
                                   label_smoothing=self.smoothing)
        s, c = self.smoothing, logits.shape[1]
        target = soft * (1.0 - s) + s / c
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


class WeightedCE(_Loss):
    """Class-weighted cross-entropy. Reduction is torch's weighted mean:
    sum_i w_{y_i} CE_i / sum_i w_{y_i}. Soft targets generalise it with sample weight
    sum_c w_c y_ic: sum_i sum_c w_c y_ic (-log p_ic) / sum_i sum_c w_c y_ic, so one-hot soft
    labels give exactly the hard-label value."""

    reweights_classes = True

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def per_sample(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-sample w-weighted CE (the numerator terms; not normalised)."""
        w = self.weight.to(logits.device)
        soft = _target(logits, batch)
        if soft is None:
            return F.cross_entropy(logits, batch["label"].to(logits.device).long(), weight=w, reduction="none")
        return -(soft * w * F.log_softmax(logits, dim=1)).sum(dim=1)

    def __call__(self, outputs: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = outputs["emotion"].float()
        w = self.weight.to(logits.device)
        soft = _target(logits, batch)
        if soft is None:
            total = F.cross_entropy(logits, batch["label"].to(logits.device).long(), weight=w)
        else:
            num = -(soft * w * F.log_softmax(logits, dim=1)).sum()
            den = (soft * w).sum().clamp(min=torch.finfo(torch.float32).tiny)
            total = num / den
        return total, {"emotion": total.detach()}


# --------------------------------------------------------------------------- factories

# Recipe values are checked against these types before anything is built (the registry builds a
# pydantic model from each factory's signature); the factories' own checks remain for direct calls.
_NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
#: in [0, 1): label smoothing, the effective-number beta
_Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False, strict=True)]


@traits(accepts_soft_labels=True)
def make_focal(task: TaskInfo, /, *, gamma: _NonNegative = 2.0,
               alpha: list[_NonNegative] | Literal["auto", "none"] = "none") -> FocalLoss:
    """Focal loss. `gamma` >= 0 down-weights easy examples; `alpha`: "none", "auto" (inverse
    training frequency, mean 1) or one weight per class."""
    if not math.isfinite(gamma) or gamma < 0:
        raise FerError(f"loss.gamma: must be a finite number >= 0 (got {gamma})")
    if alpha == "none":
        return FocalLoss(gamma, None)
    if alpha == "auto":
        return FocalLoss(gamma, torch.tensor(inverse_frequency_weights(task.class_counts), dtype=torch.float32))
    return FocalLoss(gamma, _check_weights(list(alpha), task, "alpha", allow_zero=True))


@traits(accepts_soft_labels=True)
def make_label_smoothing(task: TaskInfo, /, *, smoothing: _Fraction = 0.1) -> LabelSmoothingCE:
    """Label-smoothed cross-entropy; `smoothing` in [0, 1)."""
    if not 0.0 <= smoothing < 1.0:
        raise FerError(f"loss.smoothing: must be in [0, 1) (got {smoothing})")
    return LabelSmoothingCE(smoothing)


@traits(accepts_soft_labels=True)
def make_weighted_cross_entropy(task: TaskInfo, /, *,
                                weights: list[_Positive] | Literal["inverse", "effective"] = "inverse",
                                beta: _Fraction = 0.999) -> WeightedCE:
    """Class-weighted cross-entropy. `weights`: "inverse" (1/n_c), "effective" (Cui et al. 2019,
    with `beta`) — both normalised to mean 1 — or one positive weight per class."""
    if not 0.0 <= beta < 1.0:
        raise FerError(f"loss.beta: must be in [0, 1) (got {beta})")
    if weights == "inverse":
        w = inverse_frequency_weights(task.class_counts)
    elif weights == "effective":
        w = effective_number_weights(task.class_counts, beta)
    else:
        return WeightedCE(_check_weights(list(weights), task, "weights", allow_zero=False))
    return WeightedCE(torch.tensor(w, dtype=torch.float32))


@hookimpl
def register_losses(register):
    register("focal", make_focal)
    register("label_smoothing", make_label_smoothing)
    register("weighted_cross_entropy", make_weighted_cross_entropy)
