"""Learning-rate schedules: cosine and warmup+cosine (stepped per optimizer step), step (per epoch)
and plateau (after each validation, on the monitored metric)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from fer_core.api import FerError, ScheduleInfo, hookimpl


#: a learning rate the schedule ends at: finite and >= 0 (a negative one trains by gradient ascent)
MinLR = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]


def _check_min_lr(optimizer: torch.optim.Optimizer, min_lr: float) -> None:
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        if min_lr > base:
            raise FerError(f"schedule.min_lr: {min_lr} is above the optimizer's lr {base}")


def make_cosine(optimizer: torch.optim.Optimizer, info: ScheduleInfo, /, *, min_lr: MinLR = 0.0):
    _check_min_lr(optimizer, min_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(info.epochs * info.steps_per_epoch, 1), eta_min=min_lr)
    sched.interval = "step"
    return sched


def make_step(optimizer: torch.optim.Optimizer, info: ScheduleInfo, /, *,
              step_size: Annotated[int, Field(ge=1, strict=True)] = 10,
              gamma: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 0.1):
    """Multiply the lr by `gamma` every `step_size` epochs."""
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    sched.interval = "epoch"
    return sched


def make_plateau(optimizer: torch.optim.Optimizer, info: ScheduleInfo, /, *,
                 factor: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False, strict=True)] = 0.1,
                 patience: Annotated[int, Field(ge=0, strict=True)] = 5,
                 threshold: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 1e-4,
                 cooldown: Annotated[int, Field(ge=0, strict=True)] = 0,
                 min_lr: MinLR = 0.0):
    """Multiply the lr by `factor` when `train.monitor` has not improved (by a relative
    `threshold`) for `patience` validations (torch's ReduceLROnPlateau; its direction is
    `train.monitor_mode`). The schedule of the best published FER2013 networks."""
    _check_min_lr(optimizer, min_lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=info.monitor_mode, factor=factor,
                                                       patience=patience, threshold=threshold, cooldown=cooldown,
                                                       min_lr=min_lr)
    sched.interval = "metric"  # the engine steps it after validation, with the monitored value
    return sched


def warmup_cosine_factor(step: int, *, warmup: int, total: int, start_factor: float, floor: float) -> float:
    """LR multiplier before optimizer step ``step`` (0-based): linear warmup from
    ``start_factor`` to 1 over ``warmup`` steps, then cosine down to ``floor`` (= min_lr/base_lr),
    reached exactly at the last step (``total - 1``) and held after it."""
    if step >= total:
        return floor
    if step < warmup:
        return start_factor + (1.0 - start_factor) * (step + 1) / warmup
    span = total - warmup - 1
    if span <= 0:  # one step left after warmup: it is the last, at min_lr (a one-step run keeps the base lr)
        return 1.0 if total == 1 else floor
    progress = (step - warmup) / span
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Factor:
    """Picklable per-group lambda (LambdaLR keeps callable objects in its state_dict)."""

    def __init__(self, warmup: int, total: int, start_factor: float, floor: float) -> None:
        self.warmup, self.total, self.start_factor, self.floor = warmup, total, start_factor, floor

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, warmup=self.warmup, total=self.total,
                                    start_factor=self.start_factor, floor=self.floor)


def make_warmup_cosine(
    optimizer: torch.optim.Optimizer, info: ScheduleInfo, /, *,
    warmup_epochs: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 1.0,
    warmup_steps: Annotated[int, Field(ge=0, strict=True)] = 0,
    min_lr: MinLR = 0.0,
    warmup_start_factor: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)] = 0.0,
):
    """Linear warmup then cosine to `min_lr`, stepped per optimizer step (so gradient
    accumulation is accounted for: a step is an optimizer step, not a batch).

    `warmup_steps` > 0 wins over `warmup_epochs`; warmup is capped one step short of the run.
    """
    _check_min_lr(optimizer, min_lr)
    total = max(info.epochs * info.steps_per_epoch, 1)
    # at least one step is left to anneal, so that the run always ends at min_lr
    warmup = min(warmup_steps or round(warmup_epochs * info.steps_per_epoch), max(total - 1, 0))
    factors = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        factors.append(_Factor(warmup, total, warmup_start_factor, min_lr / base if base else 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    sched.interval = "step"
    return sched


@hookimpl
def register_schedulers(register):
    register("cosine", make_cosine)
    register("step", make_step)
    register("warmup_cosine", make_warmup_cosine)
    register("plateau", make_plateau)
