"""The `mtcnn` face detector: MTCNN (Zhang et al. 2016) with the weights facenet-pytorch 2.5.3
ships inside its wheel (``facenet_pytorch/data/{p,r,o}net.pt``, 2 MB), so it works offline:
nothing is downloaded, ever.

Why this one (docs/predict.md has the measurements): of the detectors pip can install today,
mediapipe 1.x and opencv-python-headless 5 ship no face model, and batch-face, uniface and
retina-face download weights at run time; facenet-pytorch 2.5.3 declares no torch pin (2.6.0
pins torch < 2.3) and its three small nets run on our torch as they are. MTCNN gives the five
landmarks (eyes, nose, mouth corners) alignment needs, and its pyramid runs batched over
equal-size images (video frames).

Only the nets and facenet-pytorch's ``detect_face`` (the three-stage cascade) are used, never
``MTCNN.detect`` (it wraps results in object arrays); results are float32 numpy.
"""

from __future__ import annotations

from typing import Annotated, Sequence

import cv2
import numpy as np
import torch
from pydantic import Field

from fer_core.api import FerError, hookimpl, resolve_device

Faces = tuple[np.ndarray, np.ndarray, np.ndarray]  # N×4 boxes (x1, y1, x2, y2), N scores, N×5×2 landmarks


def no_faces() -> Faces:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32)


class MtcnnDetector:
    """H×W×3 uint8 RGB image(s) → faces, sorted by score. ``detect_batch`` runs equal-size images
    through the cascade together (video frames); images of other sizes are grouped by size."""

    def __init__(self, min_face_size: int, thresholds: Sequence[float], factor: float, min_score: float,
                 max_side: int, device: str) -> None:
        try:
            from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
            from facenet_pytorch.models.utils.detect_face import detect_face
        except ImportError as e:  # pragma: no cover - a dependency of fer-toolkit
            raise FerError(f"detector mtcnn: facenet-pytorch is not installed ({e}); "
                           "pip install --no-deps facenet-pytorch==2.5.3") from None
        self.device = resolve_device(device)
        self._detect_face = detect_face
        self.nets = [net().eval().to(self.device) for net in (PNet, RNet, ONet)]  # weights from the wheel
        for net in self.nets:
            net.requires_grad_(False)
        self.min_face_size, self.thresholds, self.factor = min_face_size, list(thresholds), factor
        self.min_score, self.max_side = min_score, max_side

    def __call__(self, image: np.ndarray) -> Faces:
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Faces]:
        out: list[Faces | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            im = np.asarray(im)
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise FerError(f"detector mtcnn: expected H×W×3 uint8 images, got {im.dtype} {im.shape}")
            groups.setdefault(im.shape, []).append(i)
        for shape, idx in groups.items():
            for i, faces in zip(idx, self._same_size([images[i] for i in idx], shape)):
                out[i] = faces
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _same_size(self, images: Sequence[np.ndarray], shape: tuple[int, ...]) -> list[Faces]:
        h, w = shape[:2]
        scale = 1.0
        if self.max_side and max(h, w) > self.max_side:  # large photos: detect on a smaller copy
            scale = self.max_side / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            images = [cv2.resize(np.asarray(im), size, interpolation=cv2.INTER_AREA) for im in images]
            h, w = size[1], size[0]
        if min(h, w) < self.min_face_size:  # the pyramid would be empty (facenet-pytorch fails there)
            return [no_faces() for _ in images]
        x = torch.as_tensor(np.stack(images), device=self.device)
        boxes, points = self._detect_face(x, self.min_face_size, *self.nets, self.thresholds, self.factor,
                                          self.device)
        result = []
        for b, p in zip(boxes, points):
            b = np.asarray(b, dtype=np.float32).reshape(-1, 5)
            p = np.asarray(p, dtype=np.float32).reshape(-1, 5, 2)
            keep = b[:, 4] >= self.min_score
            b, p = b[keep], p[keep]
            order = np.argsort(-b[:, 4], kind="stable")
            b, p = b[order], p[order]
            result.append((b[:, :4] / scale, b[:, 4].copy(), p / scale))
        return result


def make_mtcnn(
    *,
    min_face_size: Annotated[int, Field(ge=12, strict=True)] = 20,
    thresholds: Annotated[list[Annotated[float, Field(gt=0, lt=1)]],
                          Field(min_length=3, max_length=3)] = [0.6, 0.7, 0.7],  # noqa: B006 - never mutated
    factor: Annotated[float, Field(gt=0.1, lt=1, allow_inf_nan=False)] = 0.709,
    min_score: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.9,
    max_side: Annotated[int, Field(ge=0, strict=True)] = 1600,
    device: str = "cpu",
) -> MtcnnDetector:
    """MTCNN with facenet-pytorch 2.5.3's bundled weights (offline). ``min_face_size``: smallest
    face searched, in pixels of the (possibly reduced) image; ``thresholds``: the three stages'
    score thresholds; ``factor``: pyramid scale step; ``min_score``: faces kept; ``max_side``:
    larger images are detected on a copy reduced to this side (0 = never); ``device``: cpu,
    cuda, auto."""
    return MtcnnDetector(min_face_size, thresholds, factor, min_score, max_side, device)


@hookimpl
def register_detectors(register):
    register("mtcnn", make_mtcnn)
