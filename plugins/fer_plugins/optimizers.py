"""Optimizers: AdamW and SGD from torch."""

from __future__ import annotations

import torch

from fer_core.api import hookimpl


def make_adamw(params, /, *, lr: float = 1e-3, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def make_sgd(params, /, *, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0)


@hookimpl
def register_optimizers(register):
    register("adamw", make_adamw)
    register("sgd", make_sgd)
