"""Learning-rate schedules from torch: cosine (stepped per optimizer step) and step (per epoch)."""

from __future__ import annotations

import torch

from fer_core.hookspecs import hookimpl
from fer_core.interfaces import ScheduleInfo


def make_cosine(optimizer: torch.optim.Optimizer, info: ScheduleInfo, /, *, min_lr: float = 0.0):
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(info.epochs * info.steps_per_epoch, 1), eta_min=min_lr)
    sched.interval = "step"
    return sched


def make_step(optimizer: torch.optim.Optimizer, info: ScheduleInfo, /, *, step_size: int = 10, gamma: float = 0.1):
    """Multiply the lr by `gamma` every `step_size` epochs."""
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    sched.interval = "epoch"
    return sched


@hookimpl
def register_schedulers(register):
    register("cosine", make_cosine)
    register("step", make_step)
