"""Food-101N (noisy web images of the Food-101 classes), tested on Food-101.

``data.root`` is the release folder (or a folder holding it)::

    Food-101N_release/
        meta/classes.txt          header "class_name", then the 101 class names
        meta/imagelist.tsv        header "class_name/key", then apple_pie/<md5>.jpg ...
        meta/verified_train.tsv   header "class_name/key<TAB>verification_label",
        meta/verified_val.tsv       then apple_pie/<md5>.jpg<TAB>1 (1 = label right, 0 = wrong)
        images/apple_pie/<md5>.jpg
    food-101/                     data.test_root, default <root>/../food-101
        meta/classes.txt          the class names, no header
        meta/test.txt             apple_pie/1011328 ... (no extension)
        images/apple_pie/1011328.jpg

Splits:

* ``train``: every image of imagelist.tsv, labelled by its class folder
  (noisy); ``verified`` from both verification files; clean label = label
  where a verification says 1.
* ``verified_train``, ``verified_val``: the images of one verification file,
  clean label = label where it says 1. Lines whose image is not in
  imagelist.tsv (one in the real release) are left out with a warning.
* ``test``: Food-101's test list, its root the Food-101 folder, classes mapped
  by name onto Food-101N's; all labels clean.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.errors import DataError
from mcpipe.extract.sources.base import UNKNOWN, SplitIndex
from mcpipe.extract.sources.common import (
    data_root, expect_header, int64, no_split, read_lines, require_file,
)

log = logging.getLogger(__name__)

NAME = "food101n"
RELEASE_FOLDER = "Food-101N_release"
CLASSES_HEADER = "class_name"
IMAGELIST_HEADER = "class_name/key"
VERIFIED_HEADER = "class_name/key\tverification_label"
VERIFIED_FILES = {"verified_train": "verified_train.tsv", "verified_val": "verified_val.tsv"}


def release_root(cfg: DataConfig) -> Path:
    root = data_root(cfg)
    if not (root / "meta").is_dir() and (root / RELEASE_FOLDER / "meta").is_dir():
        return root / RELEASE_FOLDER
    return root


def food101_root(cfg: DataConfig, release: Path) -> Path:
    if cfg.test_root:
        return Path(cfg.test_root).expanduser()
    return release.resolve().parent / "food-101"


def list_splits(cfg: DataConfig) -> list[str]:
    release = release_root(cfg)
    meta = release / "meta"
    if not (meta / "imagelist.tsv").is_file():
        return []
    splits = ["train"] + [s for s, f in VERIFIED_FILES.items() if (meta / f).is_file()]
    if (food101_root(cfg, release) / "meta" / "test.txt").is_file():
        splits.append("test")
    return splits


def read_classes(path: Path) -> list[str]:
    """Food-101N's meta/classes.txt: the header line, then one name per line."""
    lines = read_lines(require_file(path, "Food-101N class list"))
    expect_header(path, lines, CLASSES_HEADER)
    return [name for _, name in lines]


def _class_of(key: str, lookup: dict[str, int], where: str) -> int:
    """Label of ``<class>/<file>``; DataError unless the class is known."""
    cls, sep, name = key.partition("/")
    if not sep or not name or "/" in name:
        raise DataError(f"{where}: expected <class_name>/<file name>, found {key!r}")
    if cls not in lookup:
        raise DataError(f"{where}: class {cls!r} of {key!r} is not in meta/classes.txt")
    return lookup[cls]


def read_imagelist(path: Path, lookup: dict[str, int]) -> tuple[list[str], list[int]]:
    """(keys ``apple_pie/<md5>.jpg``, labels) of meta/imagelist.tsv."""
    lines = read_lines(require_file(path, "Food-101N image list"))
    expect_header(path, lines, IMAGELIST_HEADER)
    keys, labels = [], []
    for number, key in lines:
        labels.append(_class_of(key, lookup, f"{path} line {number}"))
        keys.append(key)
    return keys, labels


def read_verified(path: Path, lookup: dict[str, int]) -> dict[str, int]:
    """key -> verification (1 label right, 0 wrong) of a verified_*.tsv, in file order."""
    lines = read_lines(require_file(path, "Food-101N verification file"))
    expect_header(path, lines, VERIFIED_HEADER)
    flags: dict[str, int] = {}
    for number, line in lines:
        where = f"{path} line {number}"
        key, _, flag = line.partition("\t")
        if flag.strip() not in ("0", "1"):
            raise DataError(f"{where}: expected <class_name>/<key><TAB>0 or 1, found {line!r}")
        _class_of(key, lookup, where)
        flags[key] = int(flag)
    return flags


def read_food101_test(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """(ids ``images/<class>/<id>.jpg``, labels in Food-101N's class order) of Food-101's test list."""
    names_path = require_file(root / "meta" / "classes.txt", "Food-101 class list")
    names = [name for _, name in read_lines(names_path)]
    if sorted(names) != sorted(classes):
        extra, lacking = sorted(set(names) - set(classes)), sorted(set(classes) - set(names))
        raise DataError(f"{names_path}: the Food-101 classes do not match Food-101N's "
                        f"(only in Food-101: {extra[:5]}, only in Food-101N: {lacking[:5]})")
    lookup = {name: k for k, name in enumerate(classes)}
    path = require_file(root / "meta" / "test.txt", "Food-101 test list")
    ids, labels = [], []
    for number, key in read_lines(path):
        labels.append(_class_of(key, lookup, f"{path} line {number}"))
        ids.append(f"images/{key}.jpg")
    return ids, labels


def _train(release: Path, keys: list[str], labels: np.ndarray, classes: list[str],
           verified: dict[str, int]) -> SplitIndex:
    row = {key: i for i, key in enumerate(keys)}
    flags = np.full(len(keys), UNKNOWN, dtype=np.int8)
    for key, flag in verified.items():
        flags[row[key]] = flag
    clean = np.where(flags == 1, labels, UNKNOWN)
    return SplitIndex(source=NAME, split="train", root=release, ids=[f"images/{k}" for k in keys],
                      labels=labels, clean_labels=clean, classes=classes, verified=flags)


def _only_listed(path: Path, flags: dict[str, int], listed: set[str]) -> dict[str, int]:
    kept = {key: flag for key, flag in flags.items() if key in listed}
    if len(kept) < len(flags):
        first = next(key for key in flags if key not in listed)
        log.warning("%s: %d verified image(s) are not in imagelist.tsv and are left out (first: %s)",
                    path, len(flags) - len(kept), first)
    return kept


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    release = release_root(cfg)
    available = list_splits(cfg)
    if split not in available:
        needs = {"train": "meta/imagelist.tsv", "test": f"{food101_root(cfg, release)}/meta/test.txt",
                 **{s: f"meta/imagelist.tsv and meta/{f}" for s, f in VERIFIED_FILES.items()}}
        raise no_split(NAME, split, available, release, needs=needs.get(split, ""))
    meta = release / "meta"
    classes = read_classes(meta / "classes.txt")
    lookup = {name: k for k, name in enumerate(classes)}

    if split == "test":
        root = food101_root(cfg, release)
        ids, labels = read_food101_test(root, classes)
        return SplitIndex(source=NAME, split=split, root=root, ids=ids, labels=int64(labels),
                          clean_labels=int64(labels), classes=classes)

    keys, noisy = read_imagelist(meta / "imagelist.tsv", lookup)
    listed = set(keys)
    verified: dict[str, dict[str, int]] = {}
    for name, file in VERIFIED_FILES.items():
        if split in ("train", name) and (meta / file).is_file():
            verified[name] = _only_listed(meta / file, read_verified(meta / file, lookup), listed)

    if split == "train":
        merged = {key: flag for flags in verified.values() for key, flag in flags.items()}
        return _train(release, keys, int64(noisy), classes, merged)

    flags = verified[split]
    labels = int64([lookup[key.partition("/")[0]] for key in flags])
    verified_arr = np.fromiter(flags.values(), dtype=np.int8, count=len(flags))
    return SplitIndex(source=NAME, split=split, root=release, ids=[f"images/{k}" for k in flags],
                      labels=labels, clean_labels=np.where(verified_arr == 1, labels, UNKNOWN),
                      classes=classes, verified=verified_arr)
