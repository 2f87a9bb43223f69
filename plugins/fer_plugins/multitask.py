"""Multi-task emotion + action-unit learning.

- `au_bce`: multi-label AU loss on the `au` head's *logits* (BCE-with-logits, never a sigmoid
  followed by BCE), masked to the images that carry AU labels, with positive weights for rare AUs;
- `compound_components`: for compound classes such as RAF-CE's "Happily surprised", an auxiliary
  multi-label task predicting the basic emotions the class is made of (happy + surprise), derived
  from the class names; it declares the `components` head;
- `multitask`: combines child losses by task name, with fixed weights or learned uncertainty
  weighting (Kendall, Gal & Cipolla 2018: Σ exp(-s_t)·L_t + s_t, one learned s_t per task).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fer_core.api import (Batch, DeclaresTasks, FerError, Outputs, ReweightsClasses, TaskInfo, hookimpl, supports,
                          traits)

# ------------------------------------------------------------------ AU loss


class AUBCELoss(nn.Module):
    def __init__(self, pos_weight: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else torch.empty(0))

    def forward(self, outputs: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "au" not in outputs:
            raise FerError("loss: the AU loss needs an AU head: add [model.heads.au] to the recipe")
        logits = outputs["au"].float()
        target = batch["au"].float()
        mask = batch.get("au_mask", torch.ones_like(target)).float()
        pw = self.pos_weight if self.pos_weight.numel() else None
        per = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
        loss = (per * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, {"au": loss.detach()}


def au_pos_weights(task: TaskInfo, cap: float) -> torch.Tensor:
    """negatives/positives per AU over the labelled training images, clipped to [1, cap]."""
    n = task.au_labelled or sum(task.class_counts)
    pos = torch.tensor(task.au_positive_counts, dtype=torch.float32)
    w = (n - pos) / pos.clamp(min=1.0)
    return w.clamp(min=1.0, max=cap)


def make_au_bce(task: TaskInfo, /, *, pos_weight: Literal["auto", "none"] | list[float] = "auto",
                max_pos_weight: float = 20.0) -> AUBCELoss:
    """`pos_weight`: "auto" = negatives/positives per AU (capped at `max_pos_weight`), "none", or a list."""
    if not task.au_names:
        raise FerError("loss: the AU loss needs AU labels, and this dataset has none")
    if pos_weight == "none":
        return AUBCELoss(None)
    if pos_weight == "auto":
        return AUBCELoss(au_pos_weights(task, max_pos_weight))
    if len(pos_weight) != len(task.au_names):
        raise FerError(f"loss.pos_weight: {len(pos_weight)} values for {len(task.au_names)} AUs")
    return AUBCELoss(torch.tensor(pos_weight, dtype=torch.float32))


# ------------------------------------------------------------------ compound components

ADVERBS = {"happily": "happy", "sadly": "sad", "fearfully": "fear", "angrily": "anger",
           "disgustedly": "disgust", "surprisedly": "surprise"}
ADJECTIVES = {"happy": "happy", "sad": "sad", "fearful": "fear", "afraid": "fear", "angry": "anger",
              "disgusted": "disgust", "surprised": "surprise"}
BASIC_ORDER = ["happy", "sad", "fear", "anger", "surprise", "disgust"]


def compound_components(classes: list[str]) -> tuple[list[str], torch.Tensor]:
    """Class names like "Happily surprised" → (basic names, C×K 0/1 matrix)."""
    parts = []
    for name in classes:
        words = name.lower().replace("-", " ").split()
        if len(words) != 2 or words[0] not in ADVERBS or words[1] not in ADJECTIVES:
            raise FerError(f"loss: class '{name}' is not a compound '<Adverb> <adjective>' name such as "
                           "'Happily surprised'; compound_components needs compound classes")
        parts.append({ADVERBS[words[0]], ADJECTIVES[words[1]]})
    basic = [b for b in BASIC_ORDER if any(b in p for p in parts)]
    matrix = torch.tensor([[1.0 if b in p else 0.0 for b in basic] for p in parts])
    return basic, matrix


class ComponentsLoss(nn.Module):
    def __init__(self, basic: list[str], matrix: torch.Tensor) -> None:
        super().__init__()
        self.basic = basic
        self.register_buffer("matrix", matrix)
        self.task_sizes = {"components": len(basic)}

    def forward(self, outputs: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "components" not in outputs:
            raise FerError("loss: compound_components needs a head named 'components' ([model.heads.components])")
        if "soft_label" in batch:  # mixed targets: expected presence of each basic emotion
            target = batch["soft_label"].float() @ self.matrix
        else:
            target = self.matrix[batch["label"]]
        loss = F.binary_cross_entropy_with_logits(outputs["components"].float(), target.clamp(0, 1))
        return loss, {"components": loss.detach()}


@traits(accepts_soft_labels=True)
def make_compound_components(task: TaskInfo, /) -> ComponentsLoss:
    return ComponentsLoss(*compound_components(task.classes))


# ------------------------------------------------------------------ combination


class MultiTaskLoss(nn.Module):
    def __init__(self, children: dict[str, Any], weights: dict[str, float], weighting: str) -> None:
        super().__init__()
        self.names = list(children)
        self.losses = children
        self.modules_ = nn.ModuleDict({k: v for k, v in children.items() if isinstance(v, nn.Module)})
        self.weights = weights
        self.weighting = weighting
        self.log_vars = nn.Parameter(torch.zeros(len(children))) if weighting == "uncertainty" else None
        self.task_sizes: dict[str, int] = {}
        for child in children.values():
            if supports(child, DeclaresTasks):
                self.task_sizes.update(child.task_sizes)
        self.reweights_classes = any(supports(c, ReweightsClasses) for c in children.values())

    def forward(self, outputs: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros((), device=next(iter(outputs.values())).device)
        parts: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.names):
            value, _ = self.losses[name](outputs, batch)
            if self.log_vars is not None:
                s = self.log_vars[i]
                total = total + torch.exp(-s) * value + s
                parts[f"weight_{name}"] = torch.exp(-s).detach()
            else:
                total = total + self.weights[name] * value
            parts[name] = value.detach()
        return total, parts


@traits(nested={"losses": "loss"}, many={"losses"}, accepts_soft_labels="losses.emotion")
def make_multitask(
    task: TaskInfo, /, *,
    losses: dict[str, dict[str, Any]] = {"emotion": {"plugin": "cross_entropy"}, "au": {"plugin": "au_bce"}},  # noqa: B006
    weights: dict[str, float] = {},  # noqa: B006
    weighting: Literal["fixed", "uncertainty"] = "fixed",
) -> MultiTaskLoss:
    """`losses`: task name → a loss table (`plugin` + its keys); `weights`: task → weight for
    "fixed" weighting (missing tasks weigh 1.0); "uncertainty" learns the weights. The child
    tables are validated and built by the recipe's registry (declared `nested`): this factory
    receives the built losses."""
    unknown = sorted(set(weights) - set(losses))
    if unknown:
        raise FerError(f"loss.weights: {unknown} are not among loss.losses ({', '.join(losses)})")
    if weighting == "uncertainty" and weights:
        raise FerError("loss.weights: fixed weights cannot be combined with weighting = \"uncertainty\"")
    return MultiTaskLoss(dict(losses), {n: float(weights.get(n, 1.0)) for n in losses}, weighting)


@hookimpl
def register_losses(register):
    register("au_bce", make_au_bce)
    register("compound_components", make_compound_components)
    register("multitask", make_multitask)
