"""Class-rebalancing sampler: draws training images with probability ∝ n_class^-power."""

from __future__ import annotations

import math
from collections import Counter
from typing import Annotated

import torch
from pydantic import Field
from torch.utils.data import WeightedRandomSampler

from fer_core.api import FerError, TaskInfo, hookimpl


class OverSampler:
    """``__call__(seed)`` → a WeightedRandomSampler (with replacement) whose draws depend only on
    the seed; the loader calls it every epoch with the epoch seed."""

    def __init__(self, labels: list[int], power: float, num_samples: int) -> None:
        counts = Counter(labels)
        self.labels = list(labels)
        self.power = power
        self.weights = torch.tensor([counts[y] ** -power for y in labels], dtype=torch.float64)
        self.num_samples = num_samples or len(labels)
        #: the build warns when a class-weighting loss is combined with this (double correction)
        self.rebalances_classes = power > 0

    def class_probabilities(self) -> dict[int, float]:
        """Expected share of each class among the draws."""
        total = float(self.weights.sum())
        out: dict[int, float] = {}
        for y, w in zip(self.labels, self.weights.tolist()):
            out[y] = out.get(y, 0.0) + w / total
        return out

    def __call__(self, seed: int) -> WeightedRandomSampler:
        return WeightedRandomSampler(self.weights, self.num_samples, replacement=True,
                                     generator=torch.Generator().manual_seed(int(seed)))


def make_oversample(labels: list[int], task: TaskInfo, /, *,
                    power: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 1.0,
                    num_samples: Annotated[int, Field(ge=0, strict=True)] = 0) -> OverSampler:
    """Sample weight n_class^-power: 1 = classes balanced in expectation, 0 = uniform, in between
    a partial correction. `num_samples`: draws per epoch (0 = the training set's size)."""
    if not labels:
        raise FerError("sampler: the training split is empty")
    if not math.isfinite(power) or power < 0:
        raise FerError(f"sampler.power: must be a finite number >= 0 (got {power})")
    if num_samples < 0:
        raise FerError(f"sampler.num_samples: must be >= 0, 0 meaning the training set's size (got {num_samples})")
    sampler = OverSampler(list(labels), power, num_samples)
    if not float(sampler.weights.sum()) > 0:  # n_class^-power underflows to 0 for a large power
        raise FerError(f"sampler.power: {power} makes every sample weight 0 (n_class^-power underflows); "
                       "1 balances the classes")
    return sampler


@hookimpl
def register_samplers(register):
    register("oversample", make_oversample)
