"""Optimizers: AdamW and SGD from torch."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from fer_core.api import hookimpl


#: a learning rate: finite and > 0 (ints pass as floats, booleans do not)
LR = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
#: weight decay: finite and >= 0
Decay = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
#: a moving-average coefficient (Adam's betas, SGD momentum): in [0, 1)
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False, strict=True)]


def make_adamw(params, /, *, lr: LR = 1e-3, weight_decay: Decay = 0.05, betas: tuple[Beta, Beta] = (0.9, 0.999)) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def make_sgd(params, /, *, lr: LR = 0.01, momentum: Beta = 0.9, weight_decay: Decay = 5e-4,
             nesterov: Annotated[bool, Field(strict=True)] = True) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0)


@hookimpl
def register_optimizers(register):
    register("adamw", make_adamw)
    register("sgd", make_sgd)
