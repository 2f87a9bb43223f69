"""Dataset reader ``csv``: one CSV of labels next to a folder of images.

The CSV has a header row. Columns (names are recipe keys):

- ``path`` — image path relative to ``root`` (an absolute path is used as is);
- ``label`` — class name;
- ``split`` — optional; empty cells and a missing column mean ``default_split``;
- ``label_id`` — optional; when present (and ``classes`` is not given) it fixes the class order;
- AU columns — ``au_columns = "auto"`` takes every column named ``AU<number>`` in file order;
  cells are 0/1 (``0.0``/``1.0`` too); a row with any empty AU cell has no AU labels (``au=None``).

``group_column`` — optional; its cell is each image's group (``Sample.group``, e.g. the subject):
the core's validation hold-out and ``fer cv`` folds then never put one group on both sides (an
empty cell: no group). ``holdout_column``/``holdout_value`` re-split the whole file: rows whose ``holdout_column`` equals
``holdout_value`` become ``val``, every other row ``train`` (e.g. CK+ subject-independent folds).
The reader never opens images; the core checks them later.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field

from fer_core.api import DataSource, FerError, Sample, hookimpl

AU_COLUMN = re.compile(r"^AU\d+$")


@hookimpl
def register_datasets(register):
    register("csv", make_csv_dataset)


def _abs(p: str | Path, base: Path | None = None) -> Path:
    p = Path(p).expanduser()
    if not p.is_absolute():
        p = (base if base is not None else Path.cwd()) / p
    return Path(os.path.abspath(p))


def _au_value(cell: str) -> float | None:
    """'' → None; 0/1/0.0/1.0 → float; anything else → ValueError."""
    cell = cell.strip()
    if cell == "":
        return None
    v = float(cell)
    if v not in (0.0, 1.0):
        raise ValueError(cell)
    return v


def make_csv_dataset(
    *,
    root: Annotated[str, Field(min_length=1)],  # "" would silently mean the current folder
    labels: str = "labels.csv",
    path_column: str = "path",
    label_column: str = "label",
    split_column: str = "split",
    au_columns: list[str] | str = "auto",
    classes: list[str] = (),  # type: ignore[assignment]  # immutable default; recipes give a list
    default_split: str = "train",
    label_id_column: str = "label_id",
    holdout_column: str = "",
    holdout_value: str = "",
    group_column: str = "",
) -> DataSource:
    root_dir = _abs(root)
    if not root_dir.is_dir():
        raise FerError(f"data root not found (or not a folder): {root_dir}")
    label_file = _abs(labels, root_dir)
    if not label_file.is_file():
        raise FerError(f"label file not found: {label_file}")
    if bool(holdout_column) != bool(holdout_value):
        raise FerError(
            "csv dataset: holdout_column and holdout_value must be set together "
            f"(got holdout_column={holdout_column!r}, holdout_value={holdout_value!r})"
        )

    try:
        with open(label_file, newline="", encoding="utf-8-sig") as f:
            rows = list(_read_rows(f, label_file))
    except UnicodeDecodeError as e:
        raise FerError(f"{label_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise FerError(f"{label_file}: malformed CSV: {e}") from None
    if not rows:
        raise FerError(f"{label_file}: empty file; expected a header row with columns '{path_column}', '{label_column}'")
    (_, header), body = rows[0], rows[1:]
    header = [h.strip() for h in header]
    col = {name: i for i, name in reversed(list(enumerate(header)))}  # first occurrence wins

    def need(name: str, what: str) -> int:
        if name not in col:
            raise FerError(
                f"{label_file}:1: {what} column '{name}' not found; the header has: {', '.join(header)}"
            )
        return col[name]

    i_path = need(path_column, "path")
    i_label = need(label_column, "label")
    i_split = col.get(split_column) if split_column else None
    i_hold = need(holdout_column, "holdout") if holdout_column else None
    i_group = need(group_column, "group") if group_column else None

    if isinstance(au_columns, str):
        if au_columns.strip() == "auto":
            au_names = [h for h in header if AU_COLUMN.match(h)]
        else:  # a comma-separated list ("" = none)
            au_names = [a.strip() for a in au_columns.split(",") if a.strip()]
    else:
        au_names = [str(a) for a in au_columns]
    i_aus = [need(a, "AU") for a in au_names]

    given = [str(c) for c in (classes or ())]
    if len(set(given)) != len(given):
        raise FerError(f"csv dataset: classes has duplicates: {given}")
    i_id = col.get(label_id_column) if (label_id_column and not given) else None

    parsed: list[tuple[int, str, str, str, tuple[float, ...] | None, str | None]] = []
    id_of: dict[str, tuple[int, int]] = {}  # name → (id, first line)
    name_of: dict[int, tuple[str, int]] = {}
    width = len(header)
    for line, row in body:
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            raise FerError(f"{label_file}:{line}: expected {width} columns as in the header, got {len(row)}")
        rel = row[i_path].strip()
        name = row[i_label].strip()
        if not rel:
            raise FerError(f"{label_file}:{line}: empty '{path_column}' cell; expected an image path relative to {root_dir}")
        if not name:
            raise FerError(f"{label_file}:{line}: empty '{label_column}' cell; expected a class name")
        if given and name not in given:
            raise FerError(
                f"{label_file}:{line}: label '{name}' is not one of classes [{', '.join(given)}]"
            )
        if i_id is not None:
            raw = row[i_id].strip()
            try:
                cid = int(raw)
            except ValueError:
                raise FerError(f"{label_file}:{line}: column '{label_id_column}': expected an integer class id, got {raw!r}") from None
            if name in id_of and id_of[name][0] != cid:
                raise FerError(
                    f"{label_file}:{line}: label '{name}' has {label_id_column} {cid}, "
                    f"but {id_of[name][0]} on line {id_of[name][1]}; expected one id per class"
                )
            if cid in name_of and name_of[cid][0] != name:
                raise FerError(
                    f"{label_file}:{line}: {label_id_column} {cid} is label '{name}', "
                    f"but '{name_of[cid][0]}' on line {name_of[cid][1]}; expected one class per id"
                )
            id_of.setdefault(name, (cid, line))
            name_of.setdefault(cid, (name, line))
        if i_hold is not None:
            split = "val" if row[i_hold].strip() == holdout_value else "train"
        else:
            split = (row[i_split].strip() if i_split is not None else "") or default_split
        au: tuple[float, ...] | None = None
        if i_aus:
            vals = []
            for a, i in zip(au_names, i_aus):
                try:
                    vals.append(_au_value(row[i]))
                except ValueError:
                    raise FerError(f"{label_file}:{line}: column '{a}': expected 0 or 1 (or empty), got {row[i]!r}") from None
            au = None if any(v is None for v in vals) else tuple(vals)  # type: ignore[arg-type]
        group = (row[i_group].strip() or None) if i_group is not None else None
        parsed.append((line, rel, name, split, au, group))

    if not parsed:
        raise FerError(f"{label_file}: no data rows after the header")

    if given:
        class_list = given
    elif i_id is not None:
        class_list = [name_of[cid][0] for cid in sorted(name_of)]
    else:
        class_list = sorted({p[2] for p in parsed})
    index = {c: i for i, c in enumerate(class_list)}

    splits: dict[str, list[Sample]] = {}
    for _, rel, name, split, au, group in parsed:
        path = Path(os.path.normpath(os.path.join(root_dir, rel)))
        splits.setdefault(split, []).append(Sample(path=path, label=index[name], au=au, group=group))

    notes: list[str] = []
    if i_hold is not None:
        if not splits.get("val"):
            values = sorted({row[i_hold].strip() for _, row in body if len(row) == width})
            raise FerError(
                f"{label_file}: no row has {holdout_column} = {holdout_value!r}; values present: {', '.join(values)}"
            )
        notes.append(f"{label_file}: split by {holdout_column} = {holdout_value!r} → val, other rows → train")
    elif split_column and i_split is None:
        notes.append(f"{label_file}: no '{split_column}' column; all rows are split '{default_split}'")
    if au_names:
        missing_au = sum(1 for p in parsed if p[4] is None)
        if missing_au:
            notes.append(f"{label_file}: {missing_au} row(s) with an empty AU cell have no AU labels")
    if i_group is not None:
        ungrouped = sum(1 for p in parsed if p[5] is None)
        notes.append(f"{label_file}: groups from '{group_column}': {len({p[5] for p in parsed} - {None})} distinct"
                     + (f"; {ungrouped} row(s) with an empty cell have no group" if ungrouped else ""))

    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    return DataSource(
        classes=class_list,
        splits=splits,
        au_names=au_names,
        description=f"CSV {label_file}: {len(parsed)} images ({sizes}), {len(class_list)} classes"
        + (f", {len(au_names)} AUs" if au_names else ""),
        notes=notes,
    )


def _read_rows(f, label_file: Path):
    reader = csv.reader(f)
    for row in reader:
        yield reader.line_num, row
