"""CIFAR-100, python version: 60,000 32x32 colour images, 100 fine classes in 20 coarse ones.

::

    root/                        (or root itself holds the files)
        cifar-100-python/
            meta                 {b'fine_label_names': [b'apple', ...], b'coarse_label_names': [...]}
            train                {b'data': (50000, 3072) uint8, b'fine_labels': [...], b'coarse_labels': [...],
                                  b'filenames': [...]}
            test                 the same, 10,000 images

Splits ``train`` and ``test`` in the files' order (the order CIFAR-100N's
label files follow); ids ``<split>/<filename>``; labels the fine ones, as the
files give them (clean). The pickles are read with cifar10's restricted
unpickler: numpy arrays and plain containers only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.errors import DataError
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.extract.sources.cifar10 import _text, unpickle
from mcpipe.extract.sources.common import data_root, no_split

NAME = "cifar100"
FOLDER = "cifar-100-python"
SPLITS = ("train", "test")
META = "meta"


def files_dir(cfg: DataConfig) -> Path:
    root = data_root(cfg)
    return root / FOLDER if (root / FOLDER).is_dir() else root


def list_splits(cfg: DataConfig) -> list[str]:
    folder = files_dir(cfg)
    return [s for s in SPLITS if (folder / s).is_file()]


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pixels (N, 32, 32, 3) uint8, fine labels (N,) int64, file names) of one split file."""
    batch = unpickle(path, what="CIFAR-100 file")
    missing = [k for k in ("data", "fine_labels", "filenames") if k not in batch]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; found {sorted(batch)}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a (N, 3072) uint8 array, found {shape}")
    n = len(data)
    if len(batch["fine_labels"]) != n or len(batch["filenames"]) != n:
        raise DataError(f"{path}: {n} images but {len(batch['fine_labels'])} fine_labels and "
                        f"{len(batch['filenames'])} filenames")
    pixels = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    return pixels, np.asarray(batch["fine_labels"], dtype=np.int64), [_text(x) for x in batch["filenames"]]


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    folder = files_dir(cfg)
    available = list_splits(cfg)
    if split not in available:
        raise no_split(NAME, split, available, folder, needs=split if split in SPLITS else "")
    meta = unpickle(folder / META, what="CIFAR-100 meta file")
    if "fine_label_names" not in meta:
        raise DataError(f"{folder / META}: missing key 'fine_label_names'; found {sorted(meta)}")
    classes = [_text(x) for x in meta["fine_label_names"]]
    pixels, labels, names = read_split(folder / split)
    return SplitIndex(source=NAME, split=split, root=folder, ids=[f"{split}/{name}" for name in names],
                      labels=labels, clean_labels=labels.copy(), classes=classes,
                      pixels=np.ascontiguousarray(pixels))
