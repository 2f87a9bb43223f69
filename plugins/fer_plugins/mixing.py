"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) as batch transforms.

A mixed batch gets a mixed ``image``, a ``soft_label`` (B×classes, rows summing to 1) that the
losses use instead of ``label``, mixed ``au`` targets (with ``au_mask`` = both images labelled)
and ``mix_lambda`` (0-dim, for logging). ``label`` is left as it is. Teacher logits already in the
batch (a `teacher` transform listed before the mix) stay the first image's; the partner image's
go to ``teacher_logits_partner``, and the distill loss weighs the two by ``mix_lambda``.

Every random draw of a batch comes from its own generator, seeded from (``seed``, epoch, index
of the batch within the epoch): a resumed run, which restarts an epoch from its first batch,
mixes exactly as an uninterrupted one. Formulas: docs/techniques.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from fer_core.api import Batch, FerError, ScheduleInfo, TaskInfo, hookimpl, traits

_U64 = 2**64


@dataclass(frozen=True)
class MixPlan:
    """What one batch gets: ``method`` "none", "mixup" or "cutmix"; ``lam`` the weight of the
    original image/target (for CutMix: the fraction of pixels kept); ``perm`` (CPU, long) the
    partner of every image; ``box`` (y1, y2, x1, x2) the pasted region for CutMix."""

    method: str
    lam: float = 1.0
    perm: torch.Tensor | None = None
    box: tuple[int, int, int, int] | None = None


def cutmix_box(rng: np.random.Generator, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
    """The standard CutMix box: sides sqrt(1 - lam) of the image's, centre uniform over the
    pixels, clipped to the image (so the box may be smaller than asked: lam is then corrected)."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y1, y2 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x1, x2 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y1, y2, x1, x2


class Mix:
    """Mixup and/or CutMix; see make_mix for the parameters."""

    def __init__(self, num_classes: int, epochs: int, *, mixup_alpha: float, cutmix_alpha: float, prob: float,
                 switch_prob: float, off_last_epochs: int, seed: int) -> None:
        self.num_classes = num_classes
        self.epochs = epochs
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.off_last_epochs = off_last_epochs
        self.seed = seed
        self._epoch: int | None = None
        self._counter = 0

    def active(self, epoch: int) -> bool:
        """Whether batches of this epoch may be mixed (epochs count from 1)."""
        return (epoch <= self.epochs - self.off_last_epochs and self.prob > 0
                and (self.mixup_alpha > 0 or self.cutmix_alpha > 0))

    def draw(self, epoch: int, index: int, batch_size: int, height: int, width: int) -> MixPlan:
        """The plan of batch number ``index`` (from 0) of ``epoch``: a pure function of
        (seed, epoch, index) and the batch shape."""
        if not self.active(epoch) or batch_size == 0:
            return MixPlan("none")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % _U64, epoch % _U64, index % _U64]))
        if rng.random() >= self.prob:
            return MixPlan("none")
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        perm = torch.from_numpy(rng.permutation(batch_size)).long()
        if not use_cutmix:
            return MixPlan("mixup", lam, perm)
        box = cutmix_box(rng, lam, height, width)
        y1, y2, x1, x2 = box
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)  # the area actually kept
        return MixPlan("cutmix", lam, perm, box)

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        if epoch != self._epoch:
            self._epoch, self._counter = epoch, 0
        index = self._counter
        self._counter += 1
        image = batch["image"]
        plan = self.draw(epoch, index, image.shape[0], image.shape[-2], image.shape[-1])
        return self.apply(batch, plan)

    def apply(self, batch: Batch, plan: MixPlan) -> Batch:
        """A new batch dict mixed by ``plan``; the input's tensors are not modified."""
        if plan.method == "none":
            return batch
        image = batch["image"]
        lam = plan.lam
        perm = plan.perm.to(image.device)
        out = dict(batch)
        if plan.method == "mixup":
            if image.is_floating_point():
                out["image"] = image * lam + image[perm] * (1.0 - lam)
            else:
                mixed = image.float() * lam + image[perm].float() * (1.0 - lam)
                out["image"] = mixed.round().to(image.dtype)
        else:
            y1, y2, x1, x2 = plan.box
            mixed = image.clone()
            mixed[..., y1:y2, x1:x2] = image[..., y1:y2, x1:x2][perm]
            out["image"] = mixed
        soft = batch.get("soft_label")
        if soft is None:
            soft = F.one_hot(batch["label"].long(), self.num_classes).to(torch.float32)
        elif not soft.is_floating_point():
            soft = soft.float()
        out["soft_label"] = soft * lam + soft[perm.to(soft.device)] * (1.0 - lam)
        if "au" in batch:
            au = batch["au"]
            au = au if au.is_floating_point() else au.float()
            au_perm = perm.to(au.device)
            out["au"] = au * lam + au[au_perm] * (1.0 - lam)
            if "au_mask" in batch:
                mask = batch["au_mask"]
                out["au_mask"] = mask * mask[au_perm]
        if "teacher_logits" in batch:  # a teacher listed before the mix: each image's partner's, for the distill loss
            t = batch["teacher_logits"]
            out["teacher_logits_partner"] = t[perm.to(t.device)]
        out["mix_lambda"] = torch.tensor(lam, dtype=torch.float32, device=image.device)
        return out


def _check(key: str, value: float, lo: float, hi: float | None = None) -> None:
    if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
        want = f"in [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise FerError(f"batch_transforms.{key}: must be {want} (got {value})")


def _make(task: TaskInfo, info: ScheduleInfo, *, mixup_alpha: float, cutmix_alpha: float, prob: float,
          switch_prob: float, off_last_epochs: int, seed: int, names: dict[str, str]) -> Mix:
    _check(names["mixup_alpha"], mixup_alpha, 0.0)
    _check(names["cutmix_alpha"], cutmix_alpha, 0.0)
    _check("prob", prob, 0.0, 1.0)
    _check("switch_prob", switch_prob, 0.0, 1.0)
    if off_last_epochs < 0:
        raise FerError(f"batch_transforms.off_last_epochs: must be >= 0 (got {off_last_epochs})")
    return Mix(len(task.classes), info.epochs, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
               switch_prob=switch_prob, off_last_epochs=off_last_epochs, seed=seed)


# Recipe values are checked against these types before anything is built; `_make`'s checks
# remain for direct calls.
#: a Beta(alpha, alpha) parameter; 0 turns that method off
_Alpha = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
_Prob = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)]
_Epochs = Annotated[int, Field(ge=0, strict=True)]
_Seed = Annotated[int, Field(strict=True)]


@traits(produces_soft_labels=True)
def make_mix(task: TaskInfo, info: ScheduleInfo, /, *, mixup_alpha: _Alpha = 0.2, cutmix_alpha: _Alpha = 1.0,
             prob: _Prob = 1.0, switch_prob: _Prob = 0.5, off_last_epochs: _Epochs = 0, seed: _Seed = 0) -> Mix:
    """Mixup or CutMix per batch. An alpha of 0 disables that method; with both > 0 a batch uses
    CutMix with probability `switch_prob`. `prob`: probability a batch is mixed at all;
    `off_last_epochs`: no mixing in the last N epochs; `seed`: base of the per-batch seeds."""
    return _make(task, info, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                 switch_prob=switch_prob, off_last_epochs=off_last_epochs, seed=seed,
                 names={"mixup_alpha": "mixup_alpha", "cutmix_alpha": "cutmix_alpha"})


@traits(produces_soft_labels=True)
def make_mixup(task: TaskInfo, info: ScheduleInfo, /, *, alpha: _Alpha = 0.2, prob: _Prob = 1.0,
               off_last_epochs: _Epochs = 0, seed: _Seed = 0) -> Mix:
    """Mixup only: lam ~ Beta(alpha, alpha)."""
    return _make(task, info, mixup_alpha=alpha, cutmix_alpha=0.0, prob=prob, switch_prob=0.0,
                 off_last_epochs=off_last_epochs, seed=seed, names={"mixup_alpha": "alpha", "cutmix_alpha": "alpha"})


@traits(produces_soft_labels=True)
def make_cutmix(task: TaskInfo, info: ScheduleInfo, /, *, alpha: _Alpha = 1.0, prob: _Prob = 1.0,
                off_last_epochs: _Epochs = 0, seed: _Seed = 0) -> Mix:
    """CutMix only: lam ~ Beta(alpha, alpha), then corrected to the area kept."""
    return _make(task, info, mixup_alpha=0.0, cutmix_alpha=alpha, prob=prob, switch_prob=1.0,
                 off_last_epochs=off_last_epochs, seed=seed, names={"mixup_alpha": "alpha", "cutmix_alpha": "alpha"})


@hookimpl
def register_batch_transforms(register):
    register("mix", make_mix)
    register("mixup", make_mixup)
    register("cutmix", make_cutmix)
