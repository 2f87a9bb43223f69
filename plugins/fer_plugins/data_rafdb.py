"""Dataset reader ``rafdb``: RAF-DB (basic: 7 classes; compound: 11 classes) in its official layout.

``root/EmoLabel/list_patition_label.txt`` (sic: the official file name is misspelt; the
corrected spelling ``list_partition_label.txt`` is accepted too) has lines
``train_00001.jpg 5`` / ``test_0001.jpg 3``; labels are 1-based. The split is the file-name
prefix before the first ``_`` (``train`` / ``test``); RAF-DB has no validation split, so the core
holds out ``data.val_fraction`` of ``train`` unless the recipe picks ``test``.
Images: ``aligned = true`` → ``root/Image/aligned/<stem>_aligned.jpg``; otherwise
``root/Image/original/<name>``. Blank lines are skipped; ``\\r\\n`` and runs of spaces are accepted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from fer_core.api import DataSource, FerError, Sample, hookimpl
from fer_plugins.data_rafce import read_lines  # the same line reader, one copy

BASIC = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
COMPOUND = [
    "Happily Surprised",
    "Happily Disgusted",
    "Sadly Fearful",
    "Sadly Angry",
    "Sadly Surprised",
    "Sadly Disgusted",
    "Fearfully Angry",
    "Fearfully Surprised",
    "Angrily Surprised",
    "Angrily Disgusted",
    "Disgustedly Surprised",
]
LABEL_FILE = "list_patition_label.txt"  # sic
LABEL_FILE_CORRECTED = "list_partition_label.txt"

_INT = re.compile(r"-?[0-9]+")


@hookimpl
def register_datasets(register):
    register("rafdb", make_rafdb_dataset)


def make_rafdb_dataset(
    *,
    root: Annotated[str, Field(min_length=1)],
    subset: Literal["basic", "compound"] = "basic",
    aligned: Annotated[bool, Field(strict=True)] = True,
) -> DataSource:
    root_dir = Path(os.path.abspath(Path(root).expanduser()))
    if not root_dir.is_dir():
        raise FerError(f"data root not found (or not a folder): {root_dir}")
    classes = BASIC if subset == "basic" else COMPOUND
    label_file = root_dir / "EmoLabel" / LABEL_FILE
    if not label_file.is_file() and (root_dir / "EmoLabel" / LABEL_FILE_CORRECTED).is_file():
        label_file = root_dir / "EmoLabel" / LABEL_FILE_CORRECTED
    if not label_file.is_file():
        raise FerError(f"RAF-DB label file not found: {label_file}")
    image_dir = root_dir / "Image" / ("aligned" if aligned else "original")

    k = len(classes)
    expected = f"expected '<split>_<id>.jpg <label 1-{k}>' ({subset} subset)"
    splits: dict[str, list[Sample]] = {}
    seen: dict[str, int] = {}
    for n, line in read_lines(label_file, "RAF-DB label"):
        parts = line.split()
        if len(parts) != 2 or not _INT.fullmatch(parts[1]):
            raise FerError(f"{label_file}:{n}: {expected}, got {line!r}")
        name, raw = parts
        label = int(raw)
        if not 1 <= label <= k:
            raise FerError(f"{label_file}:{n}: label {label} out of range; {expected}, got {line!r}")
        split, sep, _ = name.partition("_")
        if not sep or not split:
            raise FerError(f"{label_file}:{n}: image name {name!r} has no '<split>_' prefix; {expected}")
        if name in seen:
            raise FerError(f"{label_file}:{n}: image '{name}' is listed twice (first on line {seen[name]})")
        seen[name] = n
        path = image_dir / (f"{Path(name).stem}_aligned.jpg" if aligned else name)
        splits.setdefault(split, []).append(Sample(path=path, label=label - 1))
    if not splits:
        raise FerError(f"{label_file}: no labels; {expected}")

    sizes = ", ".join(f"{s} {len(v)}" for s, v in splits.items())
    return DataSource(
        classes=list(classes),
        splits=splits,
        description=f"RAF-DB {subset} ({k} classes, {'aligned' if aligned else 'original'} images) "
        f"under {root_dir}: {len(seen)} images ({sizes})",
    )
