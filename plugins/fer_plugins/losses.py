"""Cross-entropy on the emotion head, with optional class weights; accepts soft labels."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from fer_core.api import Batch, FerError, Outputs, TaskInfo, hookimpl, traits


class CrossEntropy:
    def __init__(self, weight: torch.Tensor | None) -> None:
        self.weight = weight

    def __call__(self, outputs: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = outputs["emotion"].float()
        w = self.weight.to(logits.device) if self.weight is not None else None
        if "soft_label" in batch:  # mixed targets from a batch transform
            logp = F.log_softmax(logits, dim=1)
            per = -(batch["soft_label"] * logp)
            if w is not None:
                per = per * w
            loss = per.sum(dim=1).mean()
        else:
            loss = F.cross_entropy(logits, batch["label"], weight=w)
        return loss, {"emotion": loss.detach()}


@traits(accepts_soft_labels=True)
def make_cross_entropy(
    task: TaskInfo, /, *,
    class_weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]] | Literal["none", "inverse"] = "none",
) -> CrossEntropy:
    """`class_weights`: "none", "inverse" (inverse training frequency, mean 1) or one weight per class."""
    if class_weights == "none":
        return CrossEntropy(None)
    if class_weights == "inverse":
        counts = torch.tensor(task.class_counts, dtype=torch.float32).clamp(min=1)
        w = counts.sum() / counts
        return CrossEntropy(w / w.mean())
    if len(class_weights) != len(task.classes):
        raise FerError(f"loss.class_weights: {len(class_weights)} weights given for {len(task.classes)} classes")
    if not any(w > 0 for w in class_weights):
        raise FerError("loss.class_weights: every weight is 0; at least one class must weigh > 0")
    return CrossEntropy(torch.tensor(class_weights, dtype=torch.float32))


@hookimpl
def register_losses(register):
    register("cross_entropy", make_cross_entropy)
