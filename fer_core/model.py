"""A model is a Backbone plus named heads; its output is a dict task → logits."""

from __future__ import annotations

import torch
from torch import nn

from .interfaces import Backbone, Outputs


class FerModel(nn.Module):
    def __init__(self, backbone: Backbone, heads: dict[str, nn.Module], task_sizes: dict[str, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.task_sizes = {name: task_sizes[name] for name in heads}  # stored with checkpoints

    @property
    def preprocessing(self):
        return self.backbone.preprocessing

    def forward(self, images: torch.Tensor) -> Outputs:
        features = self.backbone(images)
        return {name: head(features) for name, head in self.heads.items()}
