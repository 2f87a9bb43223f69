"""The basic training transform: resize, horizontal flip, normalize (albumentations 2.x)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from fer_core.api import Preprocessing, hookimpl


class AlbumentationsAugmenter:
    """Wraps an `A.Compose`; reseeded by the engine so augmentation is a function of (seed, epoch)."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.compose(image=image)["image"]

    def set_seed(self, seed: int) -> None:
        self.compose.set_random_seed(seed)


def make_basic(pre: Preprocessing, /, *,
               hflip: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)] = 0.5,
               ) -> AlbumentationsAugmenter:
    import albumentations as A

    h, w = pre.input_size
    return AlbumentationsAugmenter(A.Compose([
        A.Resize(h, w),
        A.HorizontalFlip(p=hflip),
        A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0),
        A.ToTensorV2(),
    ], seed=0))


@hookimpl
def register_augmenters(register):
    register("basic", make_basic)
