"""A cosine classifier head: logits = scale · cos(feature, class weight).

Normalising both sides makes the logits' size independent of the feature norm, which often
helps on small, imbalanced expression datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fer_core.api import hookimpl


class CosineHead(nn.Module):
    def __init__(self, in_features: int, num_outputs: int, scale: float, learn_scale: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_outputs, in_features) * 0.01)
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))


def make_cosine_head(in_features: int, num_outputs: int, /, *, scale: float = 16.0, learn_scale: bool = False) -> nn.Module:
    """Recipe keys: `scale` (logit temperature) and `learn_scale`."""
    return CosineHead(in_features, num_outputs, scale, learn_scale)


@hookimpl
def register_heads(register):
    register("cosine", make_cosine_head)
