"""Dataset reader ``folder``: class names are folder names.

Two layouts are recognised:

- ``root/<split>/<class>/<image>`` — when every top-level folder holds only folders and one of
  them is called ``train``;
- ``root/<class>/<image>`` — otherwise; everything is split ``train`` (the core then holds out
  ``data.val_fraction`` of it for validation).

Classes are the sorted class-folder names (the union over splits); files are taken in sorted
order, only directly inside a class folder and only with one of ``extensions`` (case-insensitive).
Hidden entries (names starting with ``.``) are ignored. Images are not opened here.

``group_pattern`` (a regular expression, searched in each file name) gives every image a group
(``Sample.group``): its first capture group, or the whole match when it has none, e.g.
``"^(S\\d+)_"`` makes CK+'s ``S010_004_00000017.png`` subject ``S010``. The core's validation
hold-out and ``fer cv`` folds then never put one group on both sides. A file the pattern does
not match is an error naming it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field

from fer_core.api import DataSource, FerError, Sample, hookimpl


@hookimpl
def register_datasets(register):
    register("folder", make_folder_dataset)


def _visible(d: Path) -> list[Path]:
    try:
        return sorted((p for p in d.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as e:
        raise FerError(f"cannot list folder {d}: {e.strerror}") from None


def make_folder_dataset(
    *,
    root: Annotated[str, Field(min_length=1)],  # "" would silently mean the current folder
    extensions: list[str] = (".jpg", ".jpeg", ".png", ".bmp", ".webp"),  # type: ignore[assignment]
    group_pattern: str = "",
) -> DataSource:
    root_dir = Path(os.path.abspath(Path(root).expanduser()))
    if not root_dir.is_dir():
        raise FerError(f"data root not found (or not a folder): {root_dir}")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in (str(x).strip() for x in extensions) if e}
    if not exts:
        raise FerError("folder dataset: extensions is empty; expected e.g. ['.jpg', '.png']")
    try:
        pattern = re.compile(group_pattern) if group_pattern else None
    except re.error as e:
        raise FerError(f"folder dataset: group_pattern {group_pattern!r} is not a valid regular expression: {e}") from None

    top = [p for p in _visible(root_dir) if p.is_dir()]
    by_split = all(all(c.is_dir() for c in _visible(d)) for d in top) and any(d.name == "train" for d in top)
    layout: dict[str, list[Path]] = (
        {d.name: [c for c in _visible(d)] for d in top} if by_split else {"train": top}
    )
    class_names = sorted({c.name for dirs in layout.values() for c in dirs})
    if not class_names:
        raise FerError(
            f"{root_dir}: no class folders found; expected {root_dir}/<class>/<image> "
            f"or {root_dir}/<split>/<class>/<image> (with a 'train' split)"
        )
    index = {c: i for i, c in enumerate(class_names)}

    splits: dict[str, list[Sample]] = {}
    skipped = 0
    for split, dirs in layout.items():
        samples = splits.setdefault(split, [])
        for d in dirs:
            for f in _visible(d):
                if f.suffix.lower() in exts and f.is_file():
                    samples.append(Sample(path=f, label=index[d.name], group=_group(pattern, f)))
                else:
                    skipped += 1
    total = sum(len(v) for v in splits.values())
    if not total:
        raise FerError(f"{root_dir}: no images with extensions {', '.join(sorted(exts))} in the class folders")

    notes = [
        f"{root_dir}: layout "
        + ("<split>/<class>/<image>" if by_split else "<class>/<image> (everything is split 'train')")
    ]
    if skipped:
        notes.append(f"{root_dir}: ignored {skipped} entr(y/ies) in class folders that are not {'/'.join(sorted(exts))} files")
    present = {s.label for v in splits.values() for s in v}
    empty = [c for c in class_names if index[c] not in present]
    if empty:
        notes.append(f"{root_dir}: class folder(s) without images: {', '.join(empty)}")
    if pattern is not None:
        groups = {s.group for v in splits.values() for s in v}
        notes.append(f"{root_dir}: {len(groups)} group(s) from group_pattern {group_pattern!r}")
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    return DataSource(
        classes=class_names,
        splits=splits,
        description=f"image folders under {root_dir}: {total} images ({sizes}), {len(class_names)} classes",
        notes=notes,
    )


def _group(pattern: re.Pattern[str] | None, f: Path) -> str | None:
    """The group of one file: the pattern's first capture group (or whole match) in its name."""
    if pattern is None:
        return None
    m = pattern.search(f.name)
    found = (m.group(1) if pattern.groups else m.group(0)) if m else None
    if not found:
        raise FerError(f"{f}: file name does not match group_pattern {pattern.pattern!r}"
                       + (" (the capture group is empty)" if m else "") + "; every image needs a group")
    return found
