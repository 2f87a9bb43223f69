"""Miniature datasets in their official on-disk formats, with tiny real images (PIL).

``make_rafce_tree`` and ``make_rafdb_tree`` are shared by the data-plugin tests and the
end-to-end tests; keep their layouts identical to the real releases.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

RAFCE_CLASSES = 14
RAFDB_CLASSES = {"basic": 7, "compound": 11}

#: AU fields the RAF-CE builder cycles through: official forms plus the stray tokens the real file
#: has (lower-case prefix, two prefixes, trailing letter, repeated AU, spaces, null)
RAFCE_AU_CYCLE = [
    "1+2+5+26",
    "6+12+25",
    "l12+6",
    "LT12+25",
    "4+4+7",
    "25L+26",
    "null",
    "1+4+15",
    "R14+L12",
    " 9 + 10 ",
]


def write_image(path: Path, size: int | tuple[int, int], label: int, index: int = 0, mode: str = "RGB") -> None:
    """A small face-sized picture whose colour depends on the class (learnable, if trivially)."""
    w, h = (size, size) if isinstance(size, int) else size
    base = ((label * 53) % 256, (label * 97 + 80) % 256, (label * 29 + 160) % 256)
    im = Image.new("RGB", (w, h), base)
    d = ImageDraw.Draw(im)
    o = (index * 7) % max(1, w // 4)
    d.ellipse((w // 4 + o // 2, h // 4, 3 * w // 4, 3 * h // 4), fill=(255 - base[0], 255 - base[1], 255 - base[2]))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.convert(mode).save(path)


def make_rafce_tree(root: Path, n_per_class: int = 2, size: int = 100) -> Path:
    """RAF-CE in the official format under ``root``: all 14 classes, ``n_per_class`` images of
    each class in each of partitions 0 (train), 1 (test) and 2 (val).

    Files: ``RAFCE_emolabel.txt`` (``0001.jpg 5``), ``RAFCE_partition.txt`` (``0001.jpg 0``,
    CRLF line ends), ``RAFCE_AUlabel.txt`` (AU fields from ``RAFCE_AU_CYCLE``; the last image
    has no AU line) and ``aligned/0001_aligned.jpg`` (``size``×``size`` RGB JPEG).
    """
    root = Path(root)
    (root / "aligned").mkdir(parents=True, exist_ok=True)
    emo, part, au = [], [], []
    i = 0
    for k in range(n_per_class):
        for partition in (0, 1, 2):
            for label in range(RAFCE_CLASSES):
                i += 1
                name = f"{i:04d}.jpg"
                emo.append(f"{name} {label}")
                part.append(f"{name} {partition}")
                au.append(f"{name} {RAFCE_AU_CYCLE[i % len(RAFCE_AU_CYCLE)]}")
                write_image(root / "aligned" / f"{i:04d}_aligned.jpg", size, label, k)
    au.pop()  # one image without an AU line
    (root / "RAFCE_emolabel.txt").write_text("\n".join(emo) + "\n")
    (root / "RAFCE_partition.txt").write_bytes(("\r\n".join(part) + "\r\n").encode())
    (root / "RAFCE_AUlabel.txt").write_text("\n".join(au) + "\n")
    return root


def make_rafdb_tree(root: Path, subset: str = "basic", n_train: int = 2, n_test: int = 1, size: int = 100) -> Path:
    """RAF-DB (``basic`` 7 classes / ``compound`` 11) in the official layout under ``root``:
    ``EmoLabel/list_patition_label.txt`` (sic) with 1-based labels, ``Image/aligned/<stem>_aligned.jpg``
    and ``Image/original/<name>``; ``n_train`` train and ``n_test`` test images per class.
    """
    root = Path(root)
    k = RAFDB_CLASSES[subset]
    lines = []
    for split, n in (("train", n_train), ("test", n_test)):
        i = 0
        for j in range(n):
            for label in range(1, k + 1):
                i += 1
                name = f"{split}_{i:05d}.jpg" if split == "train" else f"{split}_{i:04d}.jpg"
                lines.append(f"{name} {label}")
                write_image(root / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg", size, label - 1, j)
                write_image(root / "Image" / "original" / name, (size + 20, size + 10), label - 1, j)
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root
