"""The four dataset readers: csv, folder, rafce, rafdb (factories called directly)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from fer_core.errors import FerError
from fer_core.interfaces import DataSource
from fer_plugins import data_csv, data_folder, data_rafce, data_rafdb
from fer_plugins.data_csv import make_csv_dataset
from fer_plugins.data_folder import make_folder_dataset
from fer_plugins.data_rafce import make_rafce_dataset
from fer_plugins.data_rafdb import make_rafdb_dataset

try:
    from builders import RAFCE_CLASSES, make_rafce_tree, make_rafdb_tree, write_image
except ImportError:  # tests/ imported as a package
    from tests.builders import RAFCE_CLASSES, make_rafce_tree, make_rafdb_tree, write_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")


def raises_at(file: Path, line: int | None, what: str):
    """pytest.raises(FerError) whose message names ``file`` (and ``:line``) and contains ``what``."""
    where = f"{file}:{line}" if line is not None else str(file)
    return pytest.raises(FerError, match=re.escape(where) + ".*" + re.escape(what))


def split_names(ds: DataSource, split: str) -> list[str]:
    return [s.path.name for s in ds.splits[split]]


# --------------------------------------------------------------------------------------- plugins


@pytest.mark.parametrize(
    "module, name, factory",
    [
        (data_csv, "csv", make_csv_dataset),
        (data_folder, "folder", make_folder_dataset),
        (data_rafce, "rafce", make_rafce_dataset),
        (data_rafdb, "rafdb", make_rafdb_dataset),
    ],
)
def test_registers_keyword_only_factory(module, name, factory):
    import inspect

    got = []
    module.register_datasets(register=lambda n, f: got.append((n, f)))
    assert got == [(name, factory)]
    for p in inspect.signature(factory).parameters.values():
        assert p.kind is p.KEYWORD_ONLY and p.annotation is not p.empty, p.name
        assert p.name == "root" or p.default is not p.empty, p.name


def test_factory_signatures_validate_with_the_registry(tmp_path):
    """Recipe values go through pydantic built from the signatures; defaults must survive it."""
    from fer_core.registry import Component

    csv_c = Component("dataset", "csv", make_csv_dataset, "data_csv", "fer-toolkit", "0")
    v = csv_c.validate({"root": "x", "au_columns": ["AU1"], "classes": ["a", "b"]}, "data")
    assert v["au_columns"] == ["AU1"] and v["classes"] == ["a", "b"]
    assert csv_c.validate({"root": "x"}, "data")["au_columns"] == "auto"
    rafce_c = Component("dataset", "rafce", make_rafce_dataset, "data_rafce", "fer-toolkit", "0")
    v = rafce_c.validate({"root": "x", "partition_names": {"0": "train", "2": "val"}, "use_au": False}, "data")
    assert v["partition_names"] == {"0": "train", "2": "val"} and v["use_au"] is False
    rafdb_c = Component("dataset", "rafdb", make_rafdb_dataset, "data_rafdb", "fer-toolkit", "0")
    assert rafdb_c.validate({"root": "x", "subset": "compound"}, "data")["subset"] == "compound"
    with pytest.raises(FerError, match="subset"):
        rafdb_c.validate({"root": "x", "subset": "both"}, "data")
    folder_c = Component("dataset", "folder", make_folder_dataset, "data_folder", "fer-toolkit", "0")
    assert folder_c.validate({"root": "x", "extensions": [".png"]}, "data")["extensions"] == [".png"]


# ------------------------------------------------------------------------------------------- csv


def write_csv(root: Path, text: str, name: str = "labels.csv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    f = root / name
    f.write_text(text)
    return f


def test_csv_basic_classes_splits_aus(tmp_path):
    write_csv(
        tmp_path,
        "path,label,split,AU1,AU12,other\n"
        "img/a.png,sad,train,1,0,x\n"
        "img/b.png,happy,val,0.0,1.0,y\n"
        "\n"
        "img/c.png,happy,,1,,z\n"
        "img/d.png,angry,test,0,0,w\n",
    )
    ds = make_csv_dataset(root=str(tmp_path))
    assert ds.classes == ["angry", "happy", "sad"]  # sorted names (no label_id column)
    assert ds.au_names == ["AU1", "AU12"]
    assert set(ds.splits) == {"train", "val", "test"}
    a, c = ds.splits["train"]
    assert a.path == tmp_path / "img" / "a.png" and a.path.is_absolute()
    assert (a.label, a.au) == (2, (1.0, 0.0))
    assert (c.path.name, c.label, c.au) == ("c.png", 1, None)  # empty split → default; empty AU → None
    (b,) = ds.splits["val"]
    assert (b.label, b.au) == (1, (0.0, 1.0))
    assert ds.splits["test"][0].label == 0
    assert any("1 row(s) with an empty AU cell" in n for n in ds.notes)


def test_csv_relative_root_default_split_and_no_split_column(tmp_path, monkeypatch):
    write_csv(tmp_path / "d", "path,label\nx.png,a\ny.png,b\n", name="lab.csv")
    monkeypatch.chdir(tmp_path)
    ds = make_csv_dataset(root="d", labels="lab.csv", default_split="all", au_columns=[])
    assert list(ds.splits) == ["all"] and ds.au_names == []
    assert [s.path for s in ds.splits["all"]] == [tmp_path / "d" / "x.png", tmp_path / "d" / "y.png"]
    assert all(s.au is None for s in ds.splits["all"])


def test_csv_label_id_orders_classes(tmp_path):
    write_csv(tmp_path, "path,label,label_id\na.png,zebra,0\nb.png,apple,2\nc.png,mango,1\nd.png,zebra,0\n")
    ds = make_csv_dataset(root=str(tmp_path))
    assert ds.classes == ["zebra", "mango", "apple"]
    assert [s.label for s in ds.splits["train"]] == [0, 2, 1, 0]


@pytest.mark.parametrize(
    "rows, line, what",
    [
        ("a.png,x,0\nb.png,x,1\n", 3, "label 'x' has label_id 1, but 0 on line 2"),
        ("a.png,x,0\nb.png,y,0\n", 3, "label_id 0 is label 'y', but 'x' on line 2"),
        ("a.png,x,0\nb.png,y,one\n", 3, "expected an integer class id, got 'one'"),
    ],
)
def test_csv_label_id_inconsistent(tmp_path, rows, line, what):
    f = write_csv(tmp_path, "path,label,label_id\n" + rows)
    with raises_at(f, line, what):
        make_csv_dataset(root=str(tmp_path))


def test_csv_explicit_classes(tmp_path):
    f = write_csv(tmp_path, "path,label,label_id\na.png,b,0\nb.png,a,1\n")
    ds = make_csv_dataset(root=str(tmp_path), classes=["a", "b", "c"])  # overrides label_id order
    assert ds.classes == ["a", "b", "c"] and [s.label for s in ds.splits["train"]] == [1, 0]
    with raises_at(f, 2, "label 'b' is not one of classes [a, c]"):
        make_csv_dataset(root=str(tmp_path), classes=["a", "c"])


def test_csv_au_columns_explicit_and_errors(tmp_path):
    f = write_csv(tmp_path, "path,label,AU2,AU1,AUx\na.png,x,1,0,1\nb.png,x,0,2,1\n")
    with raises_at(f, 3, "column 'AU1': expected 0 or 1 (or empty), got '2'"):
        make_csv_dataset(root=str(tmp_path))
    ds = make_csv_dataset(root=str(tmp_path), au_columns=["AU2", "AUx"])
    assert ds.au_names == ["AU2", "AUx"] and [s.au for s in ds.splits["train"]] == [(1.0, 1.0), (0.0, 1.0)]
    assert make_csv_dataset(root=str(tmp_path), au_columns="AUx").au_names == ["AUx"]
    with raises_at(f, 1, "AU column 'AU9' not found"):
        make_csv_dataset(root=str(tmp_path), au_columns=["AU9"])


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("path,label\na.png,x\nb.png\n", 3, "expected 2 columns as in the header, got 1"),
        ("path,label\na.png,x\n,y\n", 3, "empty 'path' cell"),
        ("path,label\na.png,\n", 2, "empty 'label' cell"),
        ("file,label\na.png,x\n", 1, "path column 'path' not found; the header has: file, label"),
    ],
)
def test_csv_malformed(tmp_path, text, line, what):
    f = write_csv(tmp_path, text)
    with raises_at(f, line, what):
        make_csv_dataset(root=str(tmp_path))


def test_csv_missing_files(tmp_path):
    with pytest.raises(FerError, match=re.escape(f"data root not found (or not a folder): {tmp_path / 'nope'}")):
        make_csv_dataset(root=str(tmp_path / "nope"))
    with pytest.raises(FerError, match=re.escape(f"label file not found: {tmp_path / 'labels.csv'}")):
        make_csv_dataset(root=str(tmp_path))
    write_csv(tmp_path, "")
    with raises_at(tmp_path / "labels.csv", None, "empty file"):
        make_csv_dataset(root=str(tmp_path))
    write_csv(tmp_path, "path,label\n")
    with raises_at(tmp_path / "labels.csv", None, "no data rows"):
        make_csv_dataset(root=str(tmp_path))


def test_csv_holdout(tmp_path):
    f = write_csv(
        tmp_path,
        "path,label,split,fold\na.png,x,train,1\nb.png,y,test,3\nc.png,x,test,2\nd.png,y,train,3\n",
    )
    ds = make_csv_dataset(root=str(tmp_path), holdout_column="fold", holdout_value="3")
    assert split_names(ds, "val") == ["b.png", "d.png"]
    assert split_names(ds, "train") == ["a.png", "c.png"]
    assert "test" not in ds.splits
    with raises_at(f, None, "no row has fold = '7'; values present: 1, 2, 3"):
        make_csv_dataset(root=str(tmp_path), holdout_column="fold", holdout_value="7")
    with raises_at(f, 1, "holdout column 'subject' not found"):
        make_csv_dataset(root=str(tmp_path), holdout_column="subject", holdout_value="S1")
    with pytest.raises(FerError, match="must be set together"):
        make_csv_dataset(root=str(tmp_path), holdout_column="fold")


@pytest.mark.skipif(not (SHARED / "fer2013" / "labels.csv").is_file(), reason="shared fer2013 data not present")
def test_csv_reads_real_fer2013():
    ds = make_csv_dataset(root=str(SHARED / "fer2013"))
    assert ds.classes == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 28709, "val": 3589}
    assert ds.au_names == []
    expected = {
        "angry": (3995, 467), "disgust": (436, 56), "fear": (4097, 496), "happy": (7215, 895),
        "neutral": (4965, 607), "sad": (4830, 653), "surprise": (3171, 415),
    }
    for i, split in enumerate(("train", "val")):
        counts = Counter(ds.classes[s.label] for s in ds.splits[split])
        assert {c: counts[c] for c in ds.classes} == {c: v[i] for c, v in expected.items()}
    first = ds.splits["train"][0]
    assert first.path.is_absolute() and first.path.parent == SHARED / "fer2013" / "images"


@pytest.mark.skipif(not (SHARED / "ckplus48_au" / "labels.csv").is_file(), reason="shared CK+ data not present")
def test_csv_reads_real_ckplus_with_aus_and_folds():
    root = str(SHARED / "ckplus48_au")
    ds = make_csv_dataset(root=root)
    assert ds.classes == ["anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise"]
    assert set(ds.splits) == {"train", "test"}
    assert sum(len(v) for v in ds.splits.values()) == 981
    assert ds.au_names[0] == "AU1" and len(ds.au_names) == 24 and all(re.fullmatch(r"AU\d+", a) for a in ds.au_names)
    assert all(s.au is not None and len(s.au) == 24 and set(s.au) <= {0.0, 1.0} for s in ds.splits["train"])
    fold = make_csv_dataset(root=root, holdout_column="fold", holdout_value="3")
    assert set(fold.splits) == {"train", "val"}
    assert len(fold.splits["train"]) + len(fold.splits["val"]) == 981 and 0 < len(fold.splits["val"]) < 981
    # subject-independent: no subject on both sides
    subj = lambda s: s.path.name.split("_")[0]  # noqa: E731
    assert not {subj(s) for s in fold.splits["train"]} & {subj(s) for s in fold.splits["val"]}


# ---------------------------------------------------------------------------------------- folder


def test_folder_class_layout(tmp_path):
    for cls, names in {"sad": ["b.png", "a.JPG"], "happy": ["z.jpeg"], "angry": []}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            write_image(tmp_path / cls / n, 8, 0)
    (tmp_path / "sad" / "notes.txt").write_text("x")
    (tmp_path / "sad" / ".hidden.png").write_text("x")
    (tmp_path / "README.md").write_text("top-level files are ignored")
    ds = make_folder_dataset(root=str(tmp_path))
    assert ds.classes == ["angry", "happy", "sad"]
    assert list(ds.splits) == ["train"]
    assert [(s.path.name, s.label) for s in ds.splits["train"]] == [("z.jpeg", 1), ("a.JPG", 2), ("b.png", 2)]
    assert all(s.path.is_absolute() and s.au is None for s in ds.splits["train"])
    assert any("<class>/<image>" in n for n in ds.notes)
    assert any("ignored 1 entr" in n for n in ds.notes)
    assert any("without images: angry" in n for n in ds.notes)
    only_png = make_folder_dataset(root=str(tmp_path), extensions=["png"])
    assert [s.path.name for s in only_png.splits["train"]] == ["b.png"]


def test_folder_split_layout(tmp_path, monkeypatch):
    for split, classes in {"train": ["cat", "dog"], "val": ["dog", "emu"], "test": ["cat"]}.items():
        for c in classes:
            write_image(tmp_path / "data" / split / c / f"{split}_{c}.png", 8, 0)
    monkeypatch.chdir(tmp_path)
    ds = make_folder_dataset(root="data")
    assert ds.classes == ["cat", "dog", "emu"]  # union over splits
    assert {k: [(s.path.name, s.label) for s in v] for k, v in ds.splits.items()} == {
        "train": [("train_cat.png", 0), ("train_dog.png", 1)],
        "val": [("val_dog.png", 1), ("val_emu.png", 2)],
        "test": [("test_cat.png", 0)],
    }
    assert ds.splits["val"][0].path == tmp_path / "data" / "val" / "dog" / "val_dog.png"


def test_folder_without_train_dir_is_class_layout(tmp_path):
    write_image(tmp_path / "a" / "x" / "1.png", 8, 0)  # images one level too deep are not found
    write_image(tmp_path / "b" / "2.png", 8, 0)
    ds = make_folder_dataset(root=str(tmp_path))
    assert ds.classes == ["a", "b"] and [s.path.name for s in ds.splits["train"]] == ["2.png"]


def test_folder_errors(tmp_path):
    with pytest.raises(FerError, match=re.escape(str(tmp_path / "missing"))):
        make_folder_dataset(root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FerError, match="no class folders found"):
        make_folder_dataset(root=str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "a.txt").write_text("")
    with pytest.raises(FerError, match="no images with extensions"):
        make_folder_dataset(root=str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------- RAF-CE

RAFCE_EMO = "0001.jpg 0\n0002.jpg 13\n0003.jpg 5\n0004.jpg 2\n0005.jpg 7\n0006.jpg 1\n"
RAFCE_PART = "0001.jpg 0\r\n0002.jpg   1\r\n0003.jpg\t2\r\n0004.jpg 0\r\n\r\n0005.jpg 0\r\n0006.jpg 2\r\n0100.jpg 0\r\n"
RAFCE_AU = (
    "0001.jpg 1+4+25\n"
    "0002.jpg l12+LT12+R6\n"
    "0003.jpg  25L+4+4 \n"
    "0004.jpg null\n"
    "0005.jpg +x+2\n"
    "9999.jpg 17\n"  # not labelled: its AU still names a column ("seen anywhere in the file")
)  # 0006.jpg has no AU line


def write_rafce(root: Path, emo=RAFCE_EMO, part=RAFCE_PART, au=RAFCE_AU) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("RAFCE_emolabel.txt", emo), ("RAFCE_partition.txt", part), ("RAFCE_AUlabel.txt", au)):
        if text is not None:
            (root / name).write_bytes(text.encode())
    return root


def test_rafce_classes_splits_and_au_rule(tmp_path):
    root = write_rafce(tmp_path)
    ds = make_rafce_dataset(root=str(root))
    assert ds.classes[0] == "Happily surprised" and ds.classes[13] == "Happily sad" and len(ds.classes) == 14
    assert ds.classes[11] == "Disgustedly surprised" and ds.classes[12] == "Happily fearful"
    assert list(ds.splits) == ["train", "test", "val"]
    assert split_names(ds, "train") == ["0001_aligned.jpg", "0004_aligned.jpg", "0005_aligned.jpg"]
    assert split_names(ds, "test") == ["0002_aligned.jpg"]
    assert split_names(ds, "val") == ["0003_aligned.jpg", "0006_aligned.jpg"]
    assert ds.splits["train"][0].path == tmp_path / "aligned" / "0001_aligned.jpg"
    assert [s.label for s in ds.splits["train"]] == [0, 2, 7]
    assert ds.au_names == ["AU1", "AU2", "AU4", "AU6", "AU12", "AU17", "AU25"]
    au = {s.path.name[:4]: s.au for v in ds.splits.values() for s in v}
    assert au == {
        "0001": (1, 0, 1, 0, 0, 0, 1),  # 1+4+25
        "0002": (0, 0, 0, 1, 1, 0, 0),  # l12, LT12 → AU12 (once), R6 → AU6
        "0003": (0, 0, 1, 0, 0, 0, 1),  # 25L → AU25, 4+4 → AU4 once
        "0004": (0, 0, 0, 0, 0, 0, 0),  # null
        "0005": (0, 1, 0, 0, 0, 0, 0),  # 'x' ignored, stray '+' skipped
        "0006": None,  # no AU line
    }
    aufile = tmp_path / "RAFCE_AUlabel.txt"
    assert f"{aufile}:5: ignored AU token 'x'" in ds.notes
    assert sum("ignored AU token" in n for n in ds.notes) == 1
    (norm,) = [n for n in ds.notes if "normalised" in n]
    assert norm.startswith(f"{aufile}: 3 AU token(s) normalised") and "2 repeated AU(s)" in norm
    assert "'l12' → AU12" in norm and "'LT12' → AU12" in norm and "'25L' → AU25" in norm
    assert any(n == f"{aufile}: 1 labelled image(s) have no AU line: no AU labels (au=None)" for n in ds.notes)
    assert any("1 image(s) without an emotion label ignored" in n for n in ds.notes)  # 0100.jpg


def test_rafce_options(tmp_path):
    root = write_rafce(tmp_path / "r")
    ds = make_rafce_dataset(root=str(root), use_au=False)
    assert ds.au_names == [] and all(s.au is None for v in ds.splits.values() for s in v)
    assert not any("AU" in n for n in ds.notes)
    (root / "RAFCE_AUlabel.txt").unlink()
    make_rafce_dataset(root=str(root), use_au=False)  # the AU file is not needed then
    with raises_at(root / "RAFCE_AUlabel.txt", None, "(set use_au = false"):
        make_rafce_dataset(root=str(root))
    ds = make_rafce_dataset(
        root=str(root), images="", image_pattern="img_{name}", use_au=False,
        partition_names={"0": "train", "1": "val", "2": "test"},
    )
    assert ds.splits["val"][0].path == root / "img_0002.jpg"
    assert split_names(ds, "test") == ["img_0003.jpg", "img_0006.jpg"]


@pytest.mark.parametrize(
    "file, text, line, what",
    [
        ("emo", "0001.jpg 0\n0002.jpg 14\n", 2, "class id 14 out of range; expected '<image> <class id 0-13>'"),
        ("emo", "0001.jpg 0\n\nfoo\n", 3, "expected '<image> <class id 0-13>', got 'foo'"),
        ("emo", "0001.jpg five\n", 1, "expected '<image> <class id 0-13>', got '0001.jpg five'"),
        ("emo", "0001.jpg 0\n0001.jpg 1\n", 2, "image '0001.jpg' is listed twice (first on line 1)"),
        ("part", "0001.jpg 0\n0002.jpg 3\n", 2, "partition id '3' is not one of partition_names (0=train, 1=test, 2=val)"),
        ("part", "0001.jpg\n", 1, "expected '<image> <partition id>', got '0001.jpg'"),
        ("au", "0001.jpg 1+4 5\n", 1, "AU token '4 5': expected an optional L/R/B/T prefix"),
    ],
)
def test_rafce_malformed(tmp_path, file, text, line, what):
    kw = {"emo": text} if file == "emo" else {"part": text} if file == "part" else {"au": text}
    write_rafce(tmp_path, **kw)
    name = {"emo": "RAFCE_emolabel.txt", "part": "RAFCE_partition.txt", "au": "RAFCE_AUlabel.txt"}[file]
    with raises_at(tmp_path / name, line, what):
        make_rafce_dataset(root=str(tmp_path))


def test_rafce_missing_inputs(tmp_path):
    write_rafce(tmp_path, emo=RAFCE_EMO + "0007.jpg 3\n")
    with raises_at(tmp_path / "RAFCE_emolabel.txt", 7, "image '0007.jpg' has an emotion label but no line in"):
        make_rafce_dataset(root=str(tmp_path))
    missing = tmp_path / "labels" / "emo.txt"
    with pytest.raises(FerError, match=re.escape(f"RAF-CE emotion label file not found: {missing}")):
        make_rafce_dataset(root=str(tmp_path), emolabel="labels/emo.txt")
    with pytest.raises(FerError, match=re.escape(f"data root not found (or not a folder): {tmp_path / 'x'}")):
        make_rafce_dataset(root=str(tmp_path / "x"))
    with pytest.raises(FerError, match="image_pattern"):
        make_rafce_dataset(root=str(tmp_path), image_pattern="{id}.jpg")


def test_rafce_builder_tree_is_complete(tmp_path):
    root = make_rafce_tree(tmp_path / "rafce", n_per_class=2, size=32)
    ds = make_rafce_dataset(root=str(root))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 28, "test": 28, "val": 28}
    for split in ("train", "val", "test"):
        assert Counter(s.label for s in ds.splits[split]) == {c: 2 for c in range(RAFCE_CLASSES)}
    samples = [s for v in ds.splits.values() for s in v]
    assert all(s.path.is_file() for s in samples)
    with Image.open(samples[0].path) as im:
        assert im.size == (32, 32) and im.format == "JPEG"
    assert ds.au_names == ["AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9", "AU10", "AU12", "AU14", "AU15", "AU25", "AU26"]
    assert sum(s.au is None for s in samples) == 1
    assert not any("ignored AU token" in n for n in ds.notes)


# ---------------------------------------------------------------------------------------- RAF-DB


def test_rafdb_basic_aligned_and_original(tmp_path):
    root = make_rafdb_tree(tmp_path / "basic", "basic", n_train=2, n_test=1, size=16)
    ds = make_rafdb_dataset(root=str(root))
    assert ds.classes == ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 14, "test": 7}
    first = ds.splits["train"][0]
    assert first.path == root / "Image" / "aligned" / "train_00001_aligned.jpg" and first.label == 0
    assert ds.splits["test"][6].path.name == "test_0007_aligned.jpg" and ds.splits["test"][6].label == 6
    assert all(s.path.is_file() for v in ds.splits.values() for s in v)
    orig = make_rafdb_dataset(root=str(root), aligned=False)
    assert orig.splits["train"][0].path == root / "Image" / "original" / "train_00001.jpg"
    assert all(s.path.is_file() for v in orig.splits.values() for s in v)


def test_rafdb_compound(tmp_path):
    root = make_rafdb_tree(tmp_path / "compound", "compound", n_train=2, n_test=1, size=16)
    ds = make_rafdb_dataset(root=str(root), subset="compound")
    assert len(ds.classes) == 11 and ds.classes[0] == "Happily Surprised" and ds.classes[-1] == "Disgustedly Surprised"
    assert Counter(s.label for s in ds.splits["train"]) == {c: 2 for c in range(11)}
    assert Counter(s.label for s in ds.splits["test"]) == {c: 1 for c in range(11)}
    lf = root / "EmoLabel" / "list_patition_label.txt"
    with raises_at(lf, 8, "label 8 out of range; expected '<split>_<id>.jpg <label 1-7>' (basic subset)"):
        make_rafdb_dataset(root=str(root), subset="basic")


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("train_00001.jpg 1\ntrain_00002.jpg 0\n", 2, "label 0 out of range"),
        ("train_00001.jpg 1\r\n\r\ntrain_00002.jpg\r\n", 3, "expected '<split>_<id>.jpg <label 1-7>' (basic subset), got 'train_00002.jpg'"),
        ("00001.jpg 1\n", 1, "image name '00001.jpg' has no '<split>_' prefix"),
        ("train_1.jpg 1\ntrain_1.jpg  2\n", 2, "image 'train_1.jpg' is listed twice (first on line 1)"),
    ],
)
def test_rafdb_malformed(tmp_path, text, line, what):
    (tmp_path / "EmoLabel").mkdir()
    f = tmp_path / "EmoLabel" / "list_patition_label.txt"
    f.write_bytes(text.encode())
    with raises_at(f, line, what):
        make_rafdb_dataset(root=str(tmp_path))


def test_rafdb_missing_label_file_and_corrected_spelling(tmp_path):
    missing = tmp_path / "EmoLabel" / "list_patition_label.txt"
    with pytest.raises(FerError, match=re.escape(f"RAF-DB label file not found: {missing}")):
        make_rafdb_dataset(root=str(tmp_path))
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_partition_label.txt").write_text("test_0001.jpg  3\n")
    ds = make_rafdb_dataset(root=str(tmp_path), aligned=False)
    assert ds.splits == {"test": [ds.splits["test"][0]]} and ds.splits["test"][0].label == 2
