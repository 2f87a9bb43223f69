"""From a DataSource (what a reader plugin found) to checked splits and DataLoaders."""

from __future__ import annotations

import hashlib
import io
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from . import dist
from .errors import FerError
from .interfaces import DataSource, Preprocessing, Sample, TaskInfo


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of every class (at least one image of classes with ≥ 2). Samples with
    groups: scikit-learn's StratifiedGroupKFold(round(1/fraction)), first fold = validation, so no
    group is on both sides (an ungrouped sample is a group of its own)."""
    if any(s.group is not None for s in samples):
        from sklearn.model_selection import StratifiedGroupKFold

        groups = [s.group if s.group is not None else f"\0{i}" for i, s in enumerate(samples)]
        if (k := min(max(2, round(1 / fraction)), len(set(groups)))) < 2:
            raise FerError("data: a group-aware validation split needs at least 2 groups")
        cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
        tr, va = next(cv.split(groups, [s.label for s in samples], groups))
        return [samples[i] for i in tr], [samples[i] for i in va]
    rng, train, val = random.Random(seed), [], []
    for label in sorted({s.label for s in samples}):
        items = sorted((s for s in samples if s.label == label), key=lambda s: str(s.path))
        rng.shuffle(items)
        n_val = min(max(int(round(len(items) * fraction)), 1), len(items) - 1) if len(items) >= 2 else 0
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


# ------------------------------------------------------------------------------------ decoding

#: Largest image (width × height) that is decoded; anything larger is reported as "too large".
#: PIL's own limit is set to match (it warns above it and refuses above twice it).
MAX_PIXELS = 100_000_000  # above a 50 MP phone photo, far below a decompression bomb
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _decode(data: bytes) -> np.ndarray:
    """Encoded bytes → H×W (grayscale) or H×W×3 (colour) uint8, fully decoded.

    EXIF orientation is applied; 16-bit grayscale is scaled (not clipped) to 8 bits; palette,
    alpha and other colour modes become RGB (alpha dropped). Raises on anything that does
    not decode completely (truncated data included)."""
    im = Image.open(io.BytesIO(data))  # reads the header only; a bytes buffer: nothing to close
    if im.width * im.height > MAX_PIXELS:
        raise Image.DecompressionBombError(f"{im.width}×{im.height} = {im.width * im.height:,} pixels")
    im.load()
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # noqa: BLE001 - unreadable EXIF metadata: the pixels are fine, keep them as stored
        pass
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        # "I" (32-bit) is how some Pillow versions read 16-bit grayscale: taken as 16-bit too
        a = np.asarray(im).astype(np.int64).clip(0, 65535)
        return ((a * 255 + 32767) // 65535).astype(np.uint8)  # 0..65535 → 0..255, rounded
    if im.mode in ("1", "LA", "La", "F"):  # "F" (float) is taken as 0..255 and clipped, as PIL does
        return np.asarray(im.convert("L"))
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")  # palette transparency must go through RGBA (PIL warns otherwise)
    return np.asarray(im.convert("RGB"))


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """A decoded image → H×W×C uint8 with C = 1 (grayscale) or 3 (RGB)."""
    if channels == 1:
        if arr.ndim == 3:  # the luma PIL's convert("L") computes (ITU-R 601-2)
            arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).convert("L"))
        return arr[:, :, None]
    return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr  # grayscale replicated


def load_image(path: Path, channels: int) -> np.ndarray:
    """H×W×C uint8; grayscale images are replicated to 3 channels when the model wants RGB.

    Decoded exactly as ``check_images`` checks it: EXIF orientation applied, 16-bit scaled."""
    return _to_channels(_decode(Path(path).read_bytes()), channels)


@dataclass(frozen=True)
class BadImage:
    path: Path
    reason: str  # short, countable: "missing", "truncated", "not an image", ...
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path} ({self.reason}{': ' + self.detail if self.detail else ''})"


_READ_ERRORS = ((FileNotFoundError, "missing"), (IsADirectoryError, "a directory, not a file"),
                (PermissionError, "permission denied"))


def _classify(path: Path, data: bytes | None, e: BaseException) -> BadImage:
    for kind, reason in _READ_ERRORS:
        if isinstance(e, kind):
            return BadImage(path, reason)
    msg = str(e)
    if data is None:  # any other error reading the file
        return BadImage(path, "cannot be read", getattr(e, "strerror", None) or msg)
    if not data:
        return BadImage(path, "empty file")
    if isinstance(e, UnidentifiedImageError):
        return BadImage(path, "not an image", "no image format recognises its contents")
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        size = msg if "×" in msg else f"{int(re.search(r'[0-9]+', msg)[0]):,} pixels"  # PIL's own message
        return BadImage(path, "too large", f"{size}, above the limit of {MAX_PIXELS:,} (fer_core.data.MAX_PIXELS)")
    if "truncated" in msg:
        return BadImage(path, "truncated", msg)
    return BadImage(path, "cannot be decoded", f"{type(e).__name__}: {msg}".rstrip(": "))


@dataclass
class ImageScan:
    """What fully decoding every image found: the bad ones, a content hash of each good one
    and, when asked for, the decoded images (so that ``cache_images`` need not decode again)."""

    bad: list[BadImage]
    digests: dict[Path, bytes]
    decoded: dict[Path, np.ndarray] | None = None


def scan_images(samples: Sequence[Sample], *, keep_decoded: bool = False) -> ImageScan:
    """Read and fully decode each distinct image once (~2 s for FER2013's 32k 48×48 JPEGs on
    one core; a thread pool is slower there: the GIL dominates for such small images)."""
    scan = ImageScan([], {}, {} if keep_decoded else None)
    with warnings.catch_warnings():
        # PIL warns (rather than refuses) between MAX_IMAGE_PIXELS and twice it: make that an error
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for path in dict.fromkeys(s.path for s in samples):
            data = None
            try:
                data = path.read_bytes()
                arr = _decode(data)
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to decode a file is that file's fault
                scan.bad.append(_classify(path, data, e))
                continue
            scan.digests[path] = hashlib.blake2b(data, digest_size=16).digest()
            if scan.decoded is not None:
                scan.decoded[path] = arr
    return scan


def _counts_text(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {why}" for why, n in counts.most_common())


def _apply_check(samples: Sequence[Sample], bad: Sequence[BadImage], skip_missing: bool
                 ) -> tuple[list[Sample], Counter[str]]:
    counts = Counter(b.reason for b in bad)
    if bad and not skip_missing:
        shown = "; ".join(str(b) for b in bad[:10])
        more = f" … and {len(bad) - 10} more" if len(bad) > 10 else ""
        why = f" [{_counts_text(counts)}]" if len(bad) > 1 else ""
        raise FerError(f"{len(bad)} image(s) missing or unreadable{why}: {shown}{more} "
                       f"(set data.skip_missing = true to skip and count them)")
    gone = {b.path for b in bad}
    return [s for s in samples if s.path not in gone], counts


def check_images(samples: Sequence[Sample], skip_missing: bool) -> tuple[list[Sample], Counter[str]]:
    """Fully decode every image. Stop with one message naming each bad file and its reason
    (missing, a directory, permission denied, empty file, not an image, truncated, too large,
    cannot be decoded), or, with ``skip_missing``, drop them: returns the kept samples and the
    number dropped per reason (``sum(counts.values())`` in all)."""
    return _apply_check(samples, scan_images(samples).bad, skip_missing)


@dataclass
class Splits:
    classes: list[str]
    au_names: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: int = 0
    notes: tuple[str, ...] = ()
    #: problems worth a warning line (duplicates across train/val, classes without images, skips)
    warnings: tuple[str, ...] = ()
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    #: path → decoded image, kept only with ``make_splits(keep_decoded=True)``; hand it to
    #: ``ImageDataset(..., decoded=...)`` to cache without decoding a second time
    decoded: dict[Path, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def task_info(self) -> TaskInfo:
        counts = Counter(s.label for s in self.train)
        labelled = [s.au for s in self.train if s.au is not None]
        return TaskInfo(classes=list(self.classes), class_counts=[counts.get(i, 0) for i in range(len(self.classes))],
                        au_names=list(self.au_names), au_labelled=len(labelled),
                        au_positive_counts=[sum(int(a[i] > 0.5) for a in labelled) for i in range(len(self.au_names))])


def _split_warnings(classes: Sequence[str], train: Sequence[Sample], val: Sequence[Sample],
                    digests: Mapping[Path, bytes]) -> list[str]:
    out = []
    first_train: dict[bytes, Path] = {}
    for s in train:
        if s.path in digests:
            first_train.setdefault(digests[s.path], s.path)
    pairs = [(first_train[d], s.path) for s in val if (d := digests.get(s.path)) in first_train]
    if pairs:
        shown = "; ".join(f"{a} = {b}" for a, b in pairs[:3]) + (", …" if len(pairs) > 3 else "")
        out.append(f"{len(pairs)} validation image(s) are exact copies of training images (same file content), "
                   f"so validation scores are optimistic; e.g. {shown}")
    for split, samples in (("training", train), ("validation", val)):
        counts = Counter(s.label for s in samples)
        if empty := [c for i, c in enumerate(classes) if not counts.get(i)]:
            out.append(f"{len(empty)} class(es) have no {split} images: {', '.join(empty)}")
    return out


def make_splits(source: DataSource, *, train_split: str, val_split: str, val_fraction: float, seed: int,
                skip_missing: bool, max_train_per_class: int = 0, check_files: bool = True,
                keep_decoded: bool = False) -> Splits:
    """Train/val samples whose images all decode, and warnings about the split.

    ``check_files``: decode every image (and look for exact duplicates between train and val);
    ``keep_decoded``: keep the decoded images in ``Splits.decoded`` (for ``cache_images``)."""
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
    found: list[str] = []
    by_reason: Counter[str] = Counter()
    scan = ImageScan([], {})
    if check_files:
        scan = scan_images(train + val, keep_decoded=keep_decoded)
        kept, by_reason = _apply_check(train + val, scan.bad, skip_missing)
        ok = {s.path for s in kept}
        train = [s for s in train if s.path in ok]
        val = [s for s in val if s.path in ok]
        if by_reason:
            found.append(f"skipped {sum(by_reason.values())} image(s) that cannot be used "
                         f"(data.skip_missing = true): {_counts_text(by_reason)}")
    if not train:
        raise FerError("data: the training split is empty")
    if not val:
        raise FerError("data: the validation split is empty")
    found += _split_warnings(source.classes, train, val, scan.digests)
    return Splits(source.classes, source.au_names, train, val, skipped=sum(by_reason.values()),
                  notes=tuple(source.notes), warnings=tuple(found), skipped_by_reason=dict(by_reason),
                  decoded=scan.decoded)


class ImageDataset(Dataset):
    """Samples → dict items. Transforms take an H×W×C uint8 array, return C×H×W float."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[np.ndarray], torch.Tensor], channels: int,
                 num_aus: int = 0, cache: bool = False, decoded: Mapping[Path, np.ndarray] | None = None) -> None:
        """``cache``: decode every image once, now; ``decoded``: images already decoded
        (``Splits.decoded``), used for the cache instead of reading those files again."""
        self.samples = list(samples)
        self.transform = transform
        self.channels = channels
        self.num_aus = num_aus
        self._cache: list[np.ndarray] | None = None
        if cache:
            got = decoded or {}
            self._cache = [_to_channels(got[s.path], channels) if s.path in got else load_image(s.path, channels)
                           for s in self.samples]

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
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()
        if t.shape[1] != h or t.shape[2] != w:
            # bilinear without antialiasing, half-pixel centres: cv2.INTER_LINEAR (the resize
            # albumentations' Resize uses in training) up to its uint8 rounding (≤ 1 grey level)
            t = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=False)[0]
            t = t.round_().clamp_(0, 255)  # whole grey levels, like the uint8 images training resizes
        t = t.div_(255.0)
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
        full, rest = divmod(n, self.batch_size)
        return full + int(bool(rest) and not self.drop_last and rest >= dist.world_size())  # see shard_batches

    def epoch(self, epoch: int) -> DataLoader:
        epoch_seed = derive_seed(self.seed, epoch)
        aug_seed = epoch_seed + RANK_SEED_STEP * dist.rank()  # each process augments its own images differently
        g = torch.Generator()
        g.manual_seed(epoch_seed)
        reseed = self.reseed
        if reseed is not None:
            reseed(aug_seed)

        def init_worker(worker_id: int) -> None:
            seed_everything(aug_seed + 1000 * (worker_id + 1))
            if reseed is not None:
                reseed(aug_seed + 1000 * (worker_id + 1))

        sampler = self.sampler_factory(epoch_seed) if self.sampler_factory else None
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                      worker_init_fn=init_worker if self.num_workers else None, persistent_workers=False)
        if dist.world_size() > 1:
            # the single-process batches, drawn the same way from the same generator, each split across ranks
            order = DataLoader(range(len(self.dataset)), batch_size=self.batch_size, shuffle=self.shuffle and sampler is None,
                               sampler=sampler, drop_last=self.drop_last, generator=g)
            return DataLoader(self.dataset, batch_sampler=dist.shard_batches(b.tolist() for b in order), **common)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle and sampler is None,
                          sampler=sampler, drop_last=self.drop_last, generator=g, **common)


RANK_SEED_STEP = 104_729


def derive_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
