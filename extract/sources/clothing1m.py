"""Clothing1M: a million web images with noisy labels, a clean subset.

::

    root/
        category_names_eng.txt     14 class names, one per line
        noisy_label_kv.txt         images/0/00/0000000.jpg 3   (key, label index)
        clean_label_kv.txt         same format, human-checked labels
        noisy_train_key_list.txt   one key per line
        clean_train_key_list.txt
        clean_val_key_list.txt
        clean_test_key_list.txt
        images/0/00/0000000.jpg ...

The text files may also sit in ``root/annotations/`` (as the release's
annotations.zip unpacks); the keys stay relative to root.

Splits:

* ``train``: the noisy training keys, labelled from noisy_label_kv.txt; clean
  label from clean_label_kv.txt where the key has one.
* ``clean_train``, ``val``, ``test``: the clean key lists, labels and clean
  labels both from clean_label_kv.txt.

Ids are the keys (paths relative to root).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.errors import DataError
from mcpipe.extract.sources.base import UNKNOWN, SplitIndex
from mcpipe.extract.sources.common import data_root, no_split, read_lines, require_file

NAME = "clothing1m"
CLASSES_FILE = "category_names_eng.txt"
NOISY_KV = "noisy_label_kv.txt"
CLEAN_KV = "clean_label_kv.txt"
KEY_LISTS = {
    "train": "noisy_train_key_list.txt",
    "clean_train": "clean_train_key_list.txt",
    "val": "clean_val_key_list.txt",
    "test": "clean_test_key_list.txt",
}


def _needs(split: str) -> tuple[str, ...]:
    return (KEY_LISTS[split], NOISY_KV, CLEAN_KV) if split == "train" else (KEY_LISTS[split], CLEAN_KV)


def meta_dir(root: Path) -> Path:
    """Where the text files are: root, or root/annotations."""
    if not (root / CLASSES_FILE).is_file() and (root / "annotations" / CLASSES_FILE).is_file():
        return root / "annotations"
    return root


def list_splits(cfg: DataConfig) -> list[str]:
    meta = meta_dir(data_root(cfg))
    return [s for s in KEY_LISTS if all((meta / f).is_file() for f in _needs(s))]


def read_kv(path: Path) -> dict[str, int]:
    """key -> label index of a ``<key> <label>`` file."""
    labels: dict[str, int] = {}
    for number, line in read_lines(require_file(path, "Clothing1M label file")):
        parts = line.split()
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            raise DataError(f"{path} line {number}: expected '<image key> <label index>', found {line!r}")
        labels[parts[0]] = int(parts[1])
    return labels


def read_keys(path: Path) -> list[str]:
    return [line for _, line in read_lines(require_file(path, "Clothing1M key list"))]


def lookup(keys: list[str], kv: dict[str, int], kv_path: Path, *, required: bool) -> np.ndarray:
    """Labels of ``keys`` in ``kv``; a missing key is ``UNKNOWN``, or a DataError when ``required``."""
    out = np.fromiter((kv.get(k, UNKNOWN) for k in keys), dtype=np.int64, count=len(keys))
    if required and (out == UNKNOWN).any():
        key = keys[int(np.flatnonzero(out == UNKNOWN)[0])]
        raise DataError(f"key {key!r} has no label in {kv_path}")
    return out


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    root = data_root(cfg)
    meta = meta_dir(root)
    available = list_splits(cfg)
    if split not in available:
        needs = " and ".join(_needs(split)) if split in KEY_LISTS else ""
        raise no_split(NAME, split, available, meta, needs=needs)
    classes = [name for _, name in read_lines(require_file(meta / CLASSES_FILE, "Clothing1M class list"))]
    keys = read_keys(meta / KEY_LISTS[split])
    clean = lookup(keys, read_kv(meta / CLEAN_KV), meta / CLEAN_KV, required=split != "train")
    if split == "train":
        labels = lookup(keys, read_kv(meta / NOISY_KV), meta / NOISY_KV, required=True)
    else:
        labels = clean
    return SplitIndex(source=NAME, split=split, root=root, ids=keys, labels=labels,
                      clean_labels=clean.copy(), classes=classes)
