"""From a detected face to the model's input: alignment and cropping (used by `fer predict`).

Two ways to cut a face out of a photo, chosen to match what the model was trained on:

- ``box`` — a square around the detector's box, ``margin`` × √(w·h) on a side, centred on the
  box (shifted down by ``shift`` × side). For models trained on loose crops such as FER2013's
  48×48 faces. The defaults were measured: MTCNN run on 535 FER2013 training faces pasted into
  a larger canvas puts a box whose √(w·h) is 1/1.08 of the FER2013 crop's side (median; the
  crops themselves vary, std of log 0.17), centred within 1.5% of the crop's centre.
- ``similarity`` — the similarity transform (rotation, uniform scale, translation; least
  squares, Umeyama) taking the five landmarks onto a template: ``fer2013`` (the median
  positions of MTCNN's landmarks in those FER2013 crops) or ``arcface`` (the common 112×112
  template of tightly aligned face-recognition crops). Upright, eye-levelled faces.
- ``none`` — the whole image is the face (``--no-detect``).

The crop is produced at the model's input size, in its channels (grayscale by the luma PIL
computes, as training decodes grey images); shrinking uses area averaging (no aliasing), growing
bilinear, and pixels outside the photo repeat its border.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from fer_core.api import FerError, Preprocessing

Method = Literal["box", "similarity", "none"]
METHODS: tuple[str, ...] = ("box", "similarity", "none")

#: five landmarks (left eye, right eye, nose, left and right mouth corner; the image's left
#: first) in units of the crop's side
TEMPLATES: dict[str, np.ndarray] = {
    # median MTCNN landmarks on FER2013 crops (see the module docstring)
    "fer2013": np.array([[0.319, 0.393], [0.693, 0.389], [0.510, 0.606], [0.351, 0.790], [0.665, 0.787]]),
    # insightface's arcface_dst, divided by 112
    "arcface": np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                         [70.7299, 92.2041]]) / 112.0,
}

#: box method defaults for FER2013-style loose crops (measured, see above)
BOX_MARGIN = 1.05
BOX_SHIFT = 0.0


@dataclass(frozen=True)
class Alignment:
    method: str = "box"
    margin: float = BOX_MARGIN  # box: side = margin × √(w·h); similarity: template zoom-out (1 = as measured)
    shift: float = BOX_SHIFT  # box: centre moved down by shift × side
    template: str = "fer2013"  # similarity

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FerError(f"--align: unknown method '{self.method}' (expected one of {', '.join(METHODS)})")
        if not (0.2 <= self.margin <= 5.0):
            raise FerError(f"--margin: {self.margin} is outside 0.2 … 5.0")
        if not (-1.0 <= self.shift <= 1.0):
            raise FerError(f"--shift: {self.shift} is outside -1 … 1")
        if self.template not in TEMPLATES:
            raise FerError(f"--template: unknown template '{self.template}' (expected one of {', '.join(TEMPLATES)})")

    def describe(self) -> dict[str, object]:
        if self.method == "box":
            return {"method": "box", "margin": self.margin, "shift": self.shift}
        if self.method == "similarity":
            return {"method": "similarity", "template": self.template, "margin": self.margin}
        return {"method": "none"}


def box_matrix(box: np.ndarray, out: tuple[int, int], margin: float, shift: float) -> np.ndarray:
    """2×3 affine matrix: the square crop around ``box`` → an ``out`` (h, w) image."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = margin * float(np.sqrt(max(x2 - x1, 1e-3) * max(y2 - y1, 1e-3)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + shift * side
    h, w = out
    sx, sy = w / side, h / side  # a non-square input stretches the square crop, as training resizes
    return np.array([[sx, 0.0, w / 2 - sx * cx], [0.0, sy, h / 2 - sy * cy]])


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (2×3) mapping points ``src`` onto ``dst`` (N×2 each)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var = (s ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ sign) / var) if var > 0 else 1.0
    return np.hstack([scale * rot, (md - scale * rot @ ms)[:, None]])


def similarity_matrix(landmarks: np.ndarray, out: tuple[int, int], template: str, margin: float) -> np.ndarray:
    h, w = out
    t = TEMPLATES[template]
    t = (t - 0.5) / margin + 0.5  # margin > 1 zooms out around the crop's centre
    return umeyama(np.asarray(landmarks, np.float64).reshape(5, 2), t * np.array([w, h]))


def warp(image: np.ndarray, m: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """``image`` through the affine ``m`` into an ``out`` (h, w) image. A shrinking transform
    first warps at (about) the source's own scale, then area-averages down: no aliasing."""
    h, w = out
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if scale < 0.99:
        big = (max(h, int(np.ceil(h / scale))), max(w, int(np.ceil(w / scale))))
        up = np.diag([big[1] / w, big[0] / h]) @ m
        large = cv2.warpAffine(image, up, (big[1], big[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return cv2.resize(large, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """H×W×3 uint8 → H×W×C (C = 1: PIL's luma, the grey training decodes; 3: as is)."""
    if channels == 1:
        return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))[:, :, None]
    return rgb


def crop_face(image: np.ndarray, box: np.ndarray | None, landmarks: np.ndarray | None, align: Alignment,
              pre: Preprocessing) -> np.ndarray:
    """H×W×3 uint8 RGB photo + one face → input_size × C uint8, C = ``pre.channels``; method
    ``none`` (or no box): the whole image at its own size (``eval_transform`` resizes it)."""
    out = tuple(int(v) for v in pre.input_size)
    if align.method == "none" or box is None:
        return to_channels(image, pre.channels)  # resized by eval_transform, exactly as `fer eval` does
    if align.method == "similarity" and landmarks is not None:
        crop = warp(image, similarity_matrix(landmarks, out, align.template, align.margin), out)
    else:
        crop = warp(image, box_matrix(np.asarray(box), out, align.margin, align.shift), out)
    return to_channels(np.ascontiguousarray(crop), pre.channels)
