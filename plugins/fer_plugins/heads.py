"""Classification heads: features → logits (never probabilities)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from fer_core.api import hookimpl


#: a dropout probability: in [0, 1) (1 would zero every feature)
DropoutP = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False, strict=True)]


def make_linear_head(in_features: int, num_outputs: int, /, *, dropout: DropoutP = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(in_features, num_outputs))


def make_mlp_head(
    in_features: int, num_outputs: int, /, *, hidden: Annotated[int, Field(ge=1, strict=True)] = 512,
    dropout: DropoutP = 0.3,
    activation: Literal["relu", "gelu"] = "relu",
) -> nn.Module:
    act = nn.ReLU() if activation == "relu" else nn.GELU()
    return nn.Sequential(nn.Linear(in_features, hidden), act, nn.Dropout(dropout), nn.Linear(hidden, num_outputs))


@hookimpl
def register_heads(register):
    register("linear", make_linear_head)
    register("mlp", make_mlp_head)
