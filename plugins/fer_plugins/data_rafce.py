"""Dataset reader ``rafce``: RAF-CE (compound expressions, 14 classes) in its official format.

Files under ``root`` (each name is a recipe key; absolute paths are used as is):

- ``RAFCE_emolabel.txt`` — ``<image> <class id 0-13>`` per line, e.g. ``0001.jpg 5``;
- ``RAFCE_partition.txt`` — ``<image> <partition id>`` per line, e.g. ``0001.jpg 0``; ids map to
  split names through ``partition_names`` (default 0 train, 1 test, 2 val);
- ``RAFCE_AUlabel.txt`` — ``<image> <AUs joined by +>`` per line, e.g. ``0001.jpg 1+4+25``.

The image of ``0001.jpg`` is ``root/<images>/<image_pattern>`` with ``{stem}`` = ``0001`` (and
``{name}`` = ``0001.jpg``); by default ``root/aligned/0001_aligned.jpg``. Blank lines are skipped;
``\\r\\n`` line ends and runs of spaces/tabs are accepted.

AU parsing rule (the real file has stray tokens such as ``l12``, ``LT12``, ``25L``, ``4+4``):

1. the text after the image name is split on ``+``; empty pieces (stray ``+``) are skipped;
2. a piece equal to ``null`` (any case) means "no AU" and adds nothing;
3. every other piece is stripped and upper-cased, then every letter is removed; the remaining
   digits are the AU number (``l12``, ``LT12``, ``25L`` → AU12, AU12, AU25). The side/position
   prefix (L, R, B, T: left/right/bottom/top only) is dropped: an AU present on one side counts
   as present;
4. an AU repeated on one line counts once;
5. a piece with no digits at all is ignored and recorded in ``DataSource.notes`` as
   ``<file>:<line>: ignored AU token '<tok>'``; a piece that still holds anything other than
   digits after step 3 (e.g. ``1 4``, ``4.5``) is an error.

One note counts the tokens that needed normalisation (anything not of the documented form
``[LRBT]?<number>``) and the repeated AUs. ``au_names`` is ``AU<n>`` for every AU number seen
anywhere in the AU file, sorted numerically; each sample's ``au`` is a 0/1 tuple over them. An
image with no AU line, or whose AU line has nothing after the image name, gets ``au=None`` (it is
masked out of the AU loss) and a note counts them. With ``use_au = false`` the AU file is not read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import Field

from fer_core.api import DataSource, FerError, Sample, hookimpl
from fer_plugins.data_csv import _abs  # one path rule for every reader: ~ expanded, relative to root

CLASSES = [
    "Happily surprised",
    "Happily disgusted",
    "Sadly fearful",
    "Sadly angry",
    "Sadly surprised",
    "Sadly disgusted",
    "Fearfully angry",
    "Fearfully surprised",
    "Fearfully disgusted",
    "Angrily surprised",
    "Angrily disgusted",
    "Disgustedly surprised",
    "Happily fearful",
    "Happily sad",
]

_DOCUMENTED_TOKEN = re.compile(r"^[LRBT]?(0|[1-9]\d*)$")
_LETTERS = re.compile(r"[A-Z]")

_INT = re.compile(r"-?[0-9]+")


@hookimpl
def register_datasets(register):
    register("rafce", make_rafce_dataset)


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; FerError when missing or not text."""
    if not path.is_file():
        raise FerError(f"{what} file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FerError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise FerError(f"cannot read {path}: {e.strerror}") from None
    out = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r").strip()
        if line:
            out.append((n, line))
    return out


@dataclass
class AuStats:
    """What the AU rule had to tolerate in one file (for DataSource.notes)."""

    ignored: list[str] = field(default_factory=list)  # one note per ignored token
    normalised: int = 0
    repeated: int = 0
    examples: list[str] = field(default_factory=list)


def parse_au_tokens(au_text: str, where: str, stats: AuStats) -> set[int]:
    """The AU numbers in one AU field, by the documented rule (see the module docstring)."""
    found: set[int] = set()
    for piece in au_text.split("+"):
        tok = piece.strip().upper()
        if not tok:
            continue  # stray '+'
        if tok == "NULL":
            if piece != "null":
                stats.normalised += 1
            continue
        digits = _LETTERS.sub("", tok)
        if not any(c.isdigit() for c in digits):
            stats.ignored.append(f"{where}: ignored AU token '{piece.strip()}'")
            continue
        if not (digits.isascii() and digits.isdigit()):
            raise FerError(
                f"{where}: AU token '{piece.strip()}': expected an optional L/R/B/T prefix and an AU number, "
                f"AUs joined by '+' (e.g. '1+L12+25'), or 'null'"
            )
        au = int(digits)
        if not _DOCUMENTED_TOKEN.match(piece):
            stats.normalised += 1
            example = f"{piece!r} → AU{au}"
            if len(stats.examples) < 5 and example not in stats.examples:
                stats.examples.append(example)
        if au in found:
            stats.repeated += 1
        found.add(au)
    return found


def make_rafce_dataset(
    *,
    root: Annotated[str, Field(min_length=1)],
    emolabel: str = "RAFCE_emolabel.txt",
    partition: str = "RAFCE_partition.txt",
    aulabel: str = "RAFCE_AUlabel.txt",
    images: str = "aligned",
    image_pattern: str = "{stem}_aligned.jpg",
    partition_names: dict[str, str] = {"0": "train", "1": "test", "2": "val"},  # noqa: B006 (never mutated)
    use_au: Annotated[bool, Field(strict=True)] = True,
) -> DataSource:
    root_dir = _abs(root)
    if not root_dir.is_dir():
        raise FerError(f"data root not found (or not a folder): {root_dir}")
    emo_file = _abs(emolabel, root_dir)
    part_file = _abs(partition, root_dir)
    image_dir = _abs(images, root_dir) if images else root_dir
    names = {str(k).strip(): str(v) for k, v in dict(partition_names).items()}
    try:
        image_pattern.format(stem="0001", name="0001.jpg")
    except (KeyError, IndexError, ValueError) as e:
        raise FerError(
            f"rafce dataset: image_pattern {image_pattern!r} is not a valid pattern ({e!r}); "
            "it may use {stem} and {name}"
        ) from None

    # emotion labels
    emo: dict[str, tuple[int, int]] = {}  # image → (class id, line)
    for n, line in read_lines(emo_file, "RAF-CE emotion label"):
        parts = line.split()
        expected = f"expected '<image> <class id 0-{len(CLASSES) - 1}>', got {line!r}"
        if len(parts) != 2 or not _INT.fullmatch(parts[1]):
            raise FerError(f"{emo_file}:{n}: {expected}")
        cid = int(parts[1])
        if not 0 <= cid < len(CLASSES):
            raise FerError(f"{emo_file}:{n}: class id {cid} out of range; {expected}")
        if parts[0] in emo:
            raise FerError(f"{emo_file}:{n}: image '{parts[0]}' is listed twice (first on line {emo[parts[0]][1]})")
        emo[parts[0]] = (cid, n)
    if not emo:
        raise FerError(f"{emo_file}: no labels; expected lines '<image> <class id 0-13>'")

    # partition
    part: dict[str, str] = {}
    part_line: dict[str, int] = {}
    for n, line in read_lines(part_file, "RAF-CE partition"):
        parts = line.split()
        if len(parts) != 2:
            raise FerError(f"{part_file}:{n}: expected '<image> <partition id>', got {line!r}")
        img, pid = parts
        if pid not in names:
            raise FerError(
                f"{part_file}:{n}: partition id {pid!r} is not one of partition_names "
                f"({', '.join(f'{k}={v}' for k, v in names.items())})"
            )
        if img in part_line:
            raise FerError(f"{part_file}:{n}: image '{img}' is listed twice (first on line {part_line[img]})")
        part[img] = names[pid]
        part_line[img] = n
    for img, (_, n) in emo.items():
        if img not in part:
            raise FerError(
                f"{emo_file}:{n}: image '{img}' has an emotion label but no line in {part_file}"
            )

    notes: list[str] = []
    extra = len(set(part) - set(emo))
    if extra:
        notes.append(f"{part_file}: {extra} image(s) without an emotion label ignored")

    # action units
    au_names: list[str] = []
    au_of: dict[str, tuple[float, ...] | None] = {}
    if use_au:
        au_file = _abs(aulabel, root_dir)
        if not au_file.is_file():
            raise FerError(f"RAF-CE AU label file not found: {au_file} (set use_au = false to train without AUs)")
        stats = AuStats()
        raw: dict[str, set[int] | None] = {}
        raw_line: dict[str, int] = {}
        for n, line in read_lines(au_file, "RAF-CE AU label"):
            parts = line.split(None, 1)
            img = parts[0]
            if img in raw_line:
                raise FerError(f"{au_file}:{n}: image '{img}' is listed twice (first on line {raw_line[img]})")
            raw_line[img] = n
            raw[img] = parse_au_tokens(parts[1], f"{au_file}:{n}", stats) if len(parts) == 2 else None
        numbers = sorted({a for s in raw.values() if s for a in s})
        au_names = [f"AU{a}" for a in numbers]
        for img, s in raw.items():
            au_of[img] = None if s is None else tuple(1.0 if a in s else 0.0 for a in numbers)
        notes.extend(stats.ignored)
        if stats.normalised or stats.repeated:
            notes.append(
                f"{au_file}: {stats.normalised} AU token(s) normalised by the documented rule"
                + (f" (e.g. {', '.join(stats.examples)})" if stats.examples else "")
                + f"; {stats.repeated} repeated AU(s) within a line counted once"
            )
        empty = [img for img in emo if raw.get(img, 0) is None]
        if empty:
            notes.append(f"{au_file}: {len(empty)} labelled image(s) have an empty AU field: no AU labels (au=None)")
        no_line = [img for img in emo if img not in raw]
        if no_line:
            notes.append(f"{au_file}: {len(no_line)} labelled image(s) have no AU line: no AU labels (au=None)")

    splits: dict[str, list[Sample]] = {}
    for split in dict.fromkeys(names.values()):
        splits[split] = []
    for img, (cid, _) in emo.items():
        path = image_dir / image_pattern.format(stem=Path(img).stem, name=img)
        splits[part[img]].append(Sample(path=path, label=cid, au=au_of.get(img)))
    splits = {k: v for k, v in splits.items() if v}

    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    return DataSource(
        classes=list(CLASSES),
        splits=splits,
        au_names=au_names,
        description=f"RAF-CE (14 compound expressions) under {root_dir}: {len(emo)} images ({sizes})"
        + (f", {len(au_names)} AUs" if au_names else ", no AU labels"),
        notes=notes,
    )
