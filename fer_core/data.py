"""From a DataSource (what a reader plugin found) to checked splits and DataLoaders."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import FerError
from .interfaces import DataSource, Preprocessing, Sample, TaskInfo


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of every class (at least one image of classes with ≥ 2)."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(items)
        n_val = int(round(len(items) * fraction))
        if len(items) >= 2:
            n_val = min(max(n_val, 1), len(items) - 1)
        else:
            n_val = 0
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return train, val


def cap_per_class(samples: Sequence[Sample], cap: int, seed: int) -> list[Sample]:
    if cap <= 0:
        return list(samples)
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out: list[Sample] = []
    for label in sorted(by_class):
        items = list(by_class[label])
        rng.shuffle(items)
        out.extend(items[:cap])
    return out


def unreadable(samples: Sequence[Sample]) -> list[tuple[Path, str]]:
    """Images that are missing or cannot be decoded (header check only: cheap)."""
    bad = []
    for s in samples:
        if not s.path.is_file():
            bad.append((s.path, "missing"))
            continue
        try:
            with Image.open(s.path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            bad.append((s.path, f"unreadable ({type(e).__name__})"))
    return bad


def check_images(samples: Sequence[Sample], skip_missing: bool) -> tuple[list[Sample], int]:
    """Stop with one message listing missing/unreadable images, or drop and count them."""
    bad = unreadable(samples)
    if bad and not skip_missing:
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:10])
        more = f" … and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise FerError(
            f"{len(bad)} image(s) missing or unreadable: {shown}{more} "
            f"(set data.skip_missing = true to skip and count them)"
        )
    gone = {p for p, _ in bad}
    return [s for s in samples if s.path not in gone], len(bad)


@dataclass
class Splits:
    classes: list[str]
    au_names: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: int = 0
    notes: tuple[str, ...] = ()

    def task_info(self) -> TaskInfo:
        counts = Counter(s.label for s in self.train)
        au_pos = [0] * len(self.au_names)
        for s in self.train:
            if s.au is not None:
                for i, v in enumerate(s.au):
                    au_pos[i] += int(v > 0.5)
        return TaskInfo(
            classes=list(self.classes),
            class_counts=[counts.get(i, 0) for i in range(len(self.classes))],
            au_names=list(self.au_names),
            au_positive_counts=au_pos,
            au_labelled=sum(1 for s in self.train if s.au is not None),
        )


def make_splits(
    source: DataSource,
    *,
    train_split: str,
    val_split: str,
    val_fraction: float,
    seed: int,
    skip_missing: bool,
    max_train_per_class: int = 0,
    check_files: bool = True,
) -> Splits:
    if train_split not in source.splits:
        raise FerError(
            f"data.train_split: split '{train_split}' not found; the dataset has: {', '.join(sorted(source.splits)) or '(none)'}"
        )
    train = list(source.splits[train_split])
    if val_split in source.splits and source.splits[val_split]:
        val = list(source.splits[val_split])
    else:
        train, val = stratified_split(train, val_fraction, seed)
    train = cap_per_class(train, max_train_per_class, seed)
    skipped = 0
    if check_files:
        kept, skipped = check_images(train + val, skip_missing)
        ok = {s.path for s in kept}
        train = [s for s in train if s.path in ok]
        val = [s for s in val if s.path in ok]
    if not train:
        raise FerError("data: the training split is empty")
    if not val:
        raise FerError("data: the validation split is empty")
    return Splits(source.classes, source.au_names, train, val, skipped, tuple(source.notes))


def load_image(path: Path, channels: int) -> np.ndarray:
    """H×W×C uint8; grayscale images are replicated to 3 channels when the model wants RGB."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


class ImageDataset(Dataset):
    """Samples → dict items. Transforms take an H×W×C uint8 array, return C×H×W float."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[np.ndarray], torch.Tensor],
        channels: int,
        num_aus: int = 0,
        cache: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.channels = channels
        self.num_aus = num_aus
        self._cache: list[np.ndarray] | None = (
            [load_image(s.path, channels) for s in self.samples] if cache else None
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        img = self._cache[i] if self._cache is not None else load_image(s.path, self.channels)
        item: dict[str, Any] = {"image": self.transform(img), "label": s.label, "index": i}
        if self.num_aus:
            if s.au is None:
                item["au"] = torch.zeros(self.num_aus)
                item["au_mask"] = torch.zeros(self.num_aus)
            else:
                item["au"] = torch.tensor(s.au, dtype=torch.float32)
                item["au_mask"] = torch.ones(self.num_aus)
        return item


def eval_transform(pre: Preprocessing) -> Callable[[np.ndarray], torch.Tensor]:
    """Deterministic resize + normalize from the checkpoint's preprocessing alone."""
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
    h, w = pre.input_size

    def transform(img: np.ndarray) -> torch.Tensor:
        if img.shape[0] != h or img.shape[1] != w:
            # cv2 INTER_LINEAR: the same resize albumentations' Resize uses in training
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
            img = img[:, :, None] if img.ndim == 2 else img
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255.0)
        return (t - mean) / std

    return transform


class EpochSeededLoader:
    """A DataLoader whose shuffling and worker augmentation depend only on (seed, epoch).

    That is what makes a resumed run see exactly the batches an uninterrupted one would.
    """

    def __init__(self, dataset: ImageDataset, *, batch_size: int, shuffle: bool, num_workers: int,
                 pin_memory: bool, seed: int, drop_last: bool, sampler_factory: Callable[[int], Any] | None = None,
                 reseed: Callable[[int], None] | None = None) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.drop_last = drop_last
        self.sampler_factory = sampler_factory  # seed → Sampler (oversampling, DistributedSampler, ...)
        self.reseed = reseed

    def __len__(self) -> int:
        """Batches per epoch; a sampler may draw more or fewer items than the dataset holds."""
        n = len(self.sampler_factory(self.seed)) if self.sampler_factory else len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> DataLoader:
        epoch_seed = derive_seed(self.seed, epoch)
        g = torch.Generator()
        g.manual_seed(epoch_seed)
        reseed = self.reseed
        if reseed is not None:
            reseed(epoch_seed)

        def init_worker(worker_id: int) -> None:
            seed_everything(epoch_seed + 1000 * (worker_id + 1))
            if reseed is not None:
                reseed(epoch_seed + 1000 * (worker_id + 1))

        sampler = self.sampler_factory(epoch_seed) if self.sampler_factory else None
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            generator=g,
            worker_init_fn=init_worker if self.num_workers else None,
            persistent_workers=False,
        )


def derive_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
