"""Test-time augmentation: flips, multi-crops and scales of the evaluation view."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic_core import core_schema

from fer_core.api import FerError, Preprocessing, hookimpl


def _crop_resize(x: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    return F.interpolate(x[..., top:top + h, left:left + w], size=(H, W), mode="bilinear", align_corners=False)


def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom by ``factor`` about the centre, keeping the size (zoom-in crops, zoom-out pads by
    edge replication)."""
    H, W = x.shape[-2:]
    h, w = max(1, round(H * factor)), max(1, round(W * factor))
    y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if factor >= 1:
        top, left = (h - H) // 2, (w - W) // 2
        return y[..., top:top + H, left:left + W]
    pt, pl = (H - h) // 2, (W - w) // 2
    return F.pad(y, (pl, W - w - pl, pt, H - h - pt), mode="replicate")


class StandardTTA:
    def __init__(self, identity: bool, hflip: bool, crops: int, crop_fraction: float, scales: list[float],
                 combine: str) -> None:
        self.identity, self.hflip, self.crops = identity, hflip, crops
        self.crop_fraction, self.scales, self.combine = crop_fraction, scales, combine

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        base = [images] if self.identity else []
        H, W = images.shape[-2:]
        if self.crops:
            h, w = max(1, round(H * self.crop_fraction)), max(1, round(W * self.crop_fraction))
            corners = [((H - h) // 2, (W - w) // 2), (0, 0), (0, W - w), (H - h, 0), (H - h, W - w)]
            base += [_crop_resize(images, t, left, h, w) for t, left in corners[: self.crops]]
        base += [_scale(images, s) for s in self.scales]
        if self.hflip:
            base += [torch.flip(v, dims=[-1]) for v in list(base)]
        return base


class _NotBool:
    """``Annotated`` marker: reject booleans before a ``Literal`` of ints, which alone takes
    true for 1 (True == 1; ``Field(strict=True)`` does not apply to literals)."""

    def __get_pydantic_core_schema__(self, source: object, handler):  # noqa: ANN001 (pydantic's handler)
        return core_schema.no_info_before_validator_function(self._check, handler(source))

    @staticmethod
    def _check(v: object) -> object:
        if isinstance(v, bool):
            raise ValueError("expected a number, not a boolean")
        return v


def make_standard_tta(
    pre: Preprocessing, /, *,
    identity: Annotated[bool, Field(strict=True)] = True,
    hflip: Annotated[bool, Field(strict=True)] = True,
    crops: Annotated[Literal[0, 1, 5], _NotBool()] = 0,
    crop_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, strict=True)] = 0.9,
    scales: list[Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]] = [],  # noqa: B006
    combine: Literal["probs", "logits"] = "probs",
) -> StandardTTA:
    """Views: the image itself, `crops` crops (1 = centre, 5 = centre + corners) of
    `crop_fraction` of the side resized back, zooms by each of `scales`; with `hflip` every view
    is also mirrored. Predictions are averaged as probabilities or logits (`combine`)."""
    if not (identity or crops or scales):
        raise FerError("tta: no view left (identity = false and no crops or scales)")
    return StandardTTA(identity, hflip, crops, crop_fraction, list(scales), combine)


@hookimpl
def register_tta(register):
    register("standard", make_standard_tta)
