"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a finished run (or an ensemble of runs)
teaches a student.

- batch transform `teacher`: adds ``batch["teacher_logits"]`` (B×C, in the *student's* class
  order, matched by name) computed by a teacher loaded with ``load_predictor`` (a run or an
  ensemble directory, or any artifact a plugin reads), either on the fly on the batch's images or once per training image on its clean eval view (cache);
- loss `distill`: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·hard loss, the hard loss being
  any registered loss table (cross-entropy by default).

Two facts a batch transform does not get from its factory context, the engine hands over
through optional methods of the transform object (see ``TeacherTransform``):
``set_student_preprocessing(pre)`` (needed on the fly: batch images are normalised for the
student) and ``set_train_samples(samples)`` (needed with ``cache = true``: the clean view of
each training image, by its ``index``). Formulas and semantics: docs/techniques.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Callable, Protocol, Sequence

from pydantic import Field

import torch
import torch.nn.functional as F
from torch import nn

from fer_core.api import (Batch, DeclaresTasks, FerError, Outputs, Predictor, Preprocessing, ReweightsClasses, Sample,
                          ScheduleInfo, TaskInfo, eval_loader, hookimpl, load_predictor, resolve_device, supports,
                          traits)

#: images per teacher forward when the cache is filled
CACHE_BATCH_SIZE = 256


# ------------------------------------------------------------------ teachers


class Teacher(Protocol):
    """What the `teacher` transform needs from a teacher: class names (the order of its logit
    columns), the preprocessing of its clean view, and emotion logits of a normalised batch
    prepared with preprocessing ``pre`` (the teacher adapts it to its own)."""

    classes: list[str]
    preprocessing: Preprocessing

    def logits(self, images: torch.Tensor, pre: Preprocessing) -> torch.Tensor: ...

    def to(self, device: torch.device) -> None: ...


def _load(path: Path, device: torch.device) -> Predictor:
    try:
        return load_predictor(path, device=str(device))
    except FerError as e:  # e.g. an fp16 teacher asked to run on the CPU: run it in fp32 there
        if "train.precision" not in str(e):
            raise
        return load_predictor(path, ["train.precision=fp32"], device=str(device))


def _same_device(a: torch.device, b: torch.device) -> bool:
    def norm(d: torch.device) -> tuple[str, int | None]:
        if d.type == "cpu":
            return ("cpu", None)
        if d.index is None:
            return (d.type, torch.cuda.current_device() if d.type == "cuda" else 0)
        return (d.type, d.index)

    return norm(torch.device(a)) == norm(torch.device(b))


class PredictorTeacher:
    """Whatever ``load_predictor`` opens — a run directory, an ensemble directory (`fer
    ensemble`), any artifact an ``artifact`` plugin reads — as a teacher: its calibrated emotion
    logits (``Predictor.logits``: a run's logits with its fitted calibrator applied; an
    ensemble's log combined probabilities). Its clean view is the predictor's preprocessing (an
    ensemble's: its first member's; every member adapts the images to its own)."""

    def __init__(self, predictor: Predictor, path: Path) -> None:
        self.predictor = predictor
        self.path = Path(path)
        self.classes = list(predictor.classes)
        self.preprocessing = predictor.preprocessing

    @classmethod
    def load(cls, path: Path, device: torch.device) -> "PredictorTeacher":
        return cls(_load(Path(path), device), Path(path))

    def to(self, device: torch.device) -> None:
        """A Predictor is placed when it is loaded: on another device the teacher is loaded again
        there (its precision then resolved for that device)."""
        if not _same_device(self.predictor.device, device):
            self.predictor = _load(self.path, device)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
        # a run teacher's raw logits: the distillation temperature plays the calibrator's role
        return self.predictor.logits(images, pre, calibrated=False)


def load_teacher(path: Path | str, device: torch.device | str = "cpu", where: str = "batch_transforms.run") -> Teacher:
    """The teacher stored at ``path`` (a run or ensemble directory, or any artifact a plugin
    reads), on ``device``."""
    path = Path(path)
    if isinstance(device, str):
        device = resolve_device(device)
    try:
        return PredictorTeacher.load(path, device)
    except FerError as e:
        raise FerError(f"{where}: '{path}' cannot be loaded as a teacher (a run or ensemble directory, or an "
                       f"artifact a plugin reads): {e}") from None


def class_order(teacher_classes: Sequence[str], student_classes: Sequence[str], where: str) -> list[int]:
    """For every student class, the column of the teacher's logits with the same name
    (case-insensitive). The two class sets must be equal."""
    index = {c.lower(): i for i, c in enumerate(teacher_classes)}
    if len(index) != len(teacher_classes) or sorted(index) != sorted(c.lower() for c in student_classes):
        raise FerError(f"{where}: the teacher's classes {list(teacher_classes)} are not the student's classes "
                       f"{list(student_classes)}; a teacher must know exactly the student's classes (any order)")
    return [index[c.lower()] for c in student_classes]


# ------------------------------------------------------------------ batch transform


class TeacherTransform:
    """Adds ``teacher_logits`` (B×C float32, student class order, on the batch's device).

    The engine hands over, before the first batch, through these optional methods:

    - ``set_student_preprocessing(pre)``: the student's ``Preprocessing`` (the batch images are
      normalised for it); required on the fly (``cache = false``);
    - ``set_train_samples(samples)``: the training split's samples, in the order of the training
      dataset (``batch["index"]`` points into it); required with ``cache = true``.
    """

    def __init__(self, teacher: Teacher, student_classes: Sequence[str], *, cache: bool = False,
                 device: str = "auto", where: str = "batch_transforms") -> None:
        self.teacher = teacher
        self.where = where
        self.order = class_order(teacher.classes, student_classes, f"{where}.run")
        self.num_classes = len(student_classes)
        self.cache = cache
        self.device = device
        self.student_pre: Preprocessing | None = None
        self.train_samples: list[Sample] | None = None
        self._store: torch.Tensor | None = None  # N×C, student class order
        self._placed: torch.device | None = None

    # ---- set by the engine
    def set_student_preprocessing(self, pre: Preprocessing) -> None:
        self.student_pre = pre

    def set_train_samples(self, samples: Sequence[Sample]) -> None:
        if self._store is not None and len(samples) != self._store.shape[0]:
            self._store = None  # another training set: refill
        self.train_samples = list(samples)

    # ---- helpers
    def _place(self, batch_device: torch.device) -> None:
        """Move the teacher once: to the batch's device ("auto") or the requested one."""
        if self._placed is None:
            self._placed = batch_device if self.device == "auto" else resolve_device(self.device)
            self.teacher.to(self._placed)

    def _aligned(self, logits: torch.Tensor, device: torch.device) -> torch.Tensor:
        logits = logits.detach().to(device=device, dtype=torch.float32)
        if logits.ndim != 2 or logits.shape[1] != len(self.order):
            raise FerError(f"{self.where}: the teacher returned logits of shape {tuple(logits.shape)}, "
                           f"expected B×{len(self.order)}")
        return logits[:, torch.tensor(self.order, device=device)]

    @torch.no_grad()
    def _fill(self, device: torch.device) -> None:
        """Teacher logits of every training image's clean eval view (the teacher's own
        preprocessing, no augmentation), once, keyed by the index in the training set."""
        if self.train_samples is None:
            raise FerError(f"{self.where}: cache = true needs the training samples, and the engine did not hand "
                           "them over (set_train_samples was never called); use cache = false, or a fer whose "
                           "build_all calls set_train_samples on the batch transforms that have it")
        pre = self.teacher.preprocessing
        store = torch.full((len(self.train_samples), self.num_classes), float("nan"), device=device)
        for b in eval_loader(self.train_samples, pre, 0, CACHE_BATCH_SIZE, 0, False):
            store[b["index"].to(device)] = self._aligned(self.teacher.logits(b["image"], pre), device)
        self._store = store

    def _cached(self, batch: Batch) -> torch.Tensor:
        if "mix_lambda" in batch:
            raise FerError(f"{self.where}: the batch is already mixed; cache = true cannot be combined with a mix "
                           "transform listed before teacher (the cached logits are those of unmixed images): list "
                           "teacher before mix, or use cache = false")
        if "index" not in batch:
            raise FerError(f"{self.where}: cache = true needs batch['index'] (the position in the training set)")
        device = batch["image"].device
        if self._store is None:
            self._fill(device)
        index = batch["index"].to(self._store.device).long()
        n = self._store.shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise FerError(f"{self.where}: batch index {int(index.max())} is outside the {n} cached training images")
        return self._store[index].to(device)

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        image = batch["image"]
        self._place(image.device)
        if self.cache:
            logits = self._cached(batch)
        else:
            if self.student_pre is None:
                raise FerError(f"{self.where}: the teacher does not know how the batch images were normalised: "
                               "the engine must call set_student_preprocessing(model.preprocessing) on this "
                               "transform before training")
            with torch.no_grad():
                logits = self._aligned(self.teacher.logits(image, self.student_pre), image.device)
        out = dict(batch)
        out["teacher_logits"] = logits
        return out


def make_teacher(task: TaskInfo, info: ScheduleInfo, /, *, run: str, cache: bool = False,
                 device: str = "auto") -> TeacherTransform:
    """`run`: a finished run directory or an ensemble directory; `cache`: compute the teacher's
    logits once per training image on its clean view instead of on every batch's images;
    `device`: where the teacher runs ("auto" = the student's device)."""
    if device != "auto":
        try:
            resolve_device(device)
        except FerError as e:
            raise FerError(f"batch_transforms.device: {str(e).split(': ', 1)[-1]}") from None
    teacher = load_teacher(run, "auto" if device == "auto" else device)
    return TeacherTransform(teacher, task.classes, cache=cache, device=device)


# ------------------------------------------------------------------ loss


class DistillLoss(nn.Module):
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·hard(outputs, batch); t the teacher's
    logits (``batch["teacher_logits"]``), s the student's emotion logits, float32 math."""

    def __init__(self, hard: Any, temperature: float, alpha: float) -> None:
        super().__init__()
        self.hard = hard  # an nn.Module hard loss is registered: its parameters train and checkpoint
        self.temperature = temperature
        self.alpha = alpha
        self.task_sizes: dict[str, int] = dict(hard.task_sizes) if supports(hard, DeclaresTasks) else {}
        self.reweights_classes = supports(hard, ReweightsClasses)

    def kd(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """T²·KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch."""
        t = self.temperature
        s = student.float() / t
        q = teacher.detach().to(device=student.device, dtype=torch.float32) / t
        kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(q, dim=1), log_target=True, reduction="batchmean")
        return kl * (t * t)

    def forward(self, outputs: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "teacher_logits" not in batch:
            raise FerError('loss: the distill loss needs teacher logits in the batch: add [[batch_transforms]] '
                           'plugin = "teacher" with run = "<teacher run or ensemble directory>" to the recipe')
        student = outputs["emotion"]
        teacher = batch["teacher_logits"]
        if teacher.shape != student.shape:
            raise FerError(f"loss: teacher_logits have shape {tuple(teacher.shape)}, the student's emotion "
                           f"logits {tuple(student.shape)}")
        kd = self.kd(student, teacher)
        partner = batch.get("teacher_logits_partner")
        if partner is not None:
            # mixed after the teacher: λ·KD(t) + (1 − λ)·KD(t_partner) has exactly the gradient of the KD to
            # the mixture λ·p(t) + (1 − λ)·p(t_partner) (cross-entropy is linear in its target; the
            # entropies it differs by do not depend on the student)
            lam = float(batch["mix_lambda"])
            kd = lam * kd + (1.0 - lam) * self.kd(student, partner)
        hard, _ = self.hard(outputs, batch)
        hard = hard.float()
        total = self.alpha * kd + (1.0 - self.alpha) * hard
        return total, {"kd": kd.detach(), "hard": hard.detach(), "emotion": total.detach()}


@traits(nested={"hard": "loss"}, accepts_soft_labels="hard")
def make_distill(task: TaskInfo, /, *,
                 temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 4.0,
                 alpha: Annotated[float, Field(ge=0, le=1)] = 0.7,
                 hard: dict[str, Any] = {"plugin": "cross_entropy"}) -> DistillLoss:  # noqa: B006
    """`temperature` T > 0 softens both distributions; `alpha` in [0, 1] weighs the KD term
    against the `hard` loss (any loss table, default cross-entropy; validated and built by the
    recipe's registry, so this factory receives the built loss)."""
    return DistillLoss(hard, float(temperature), float(alpha))


@hookimpl
def register_batch_transforms(register):
    register("teacher", make_teacher)


@hookimpl
def register_losses(register):
    register("distill", make_distill)
