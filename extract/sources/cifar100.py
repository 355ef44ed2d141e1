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
from mcpipe.extract.sources.cifar10 import _text, read_batch, unpickle
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


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    folder = files_dir(cfg)
    available = list_splits(cfg)
    if split not in available:
        raise no_split(NAME, split, available, folder, needs=split if split in SPLITS else "")
    meta = unpickle(folder / META, what="CIFAR-100 meta file")
    if "fine_label_names" not in meta:
        raise DataError(f"{folder / META}: missing key 'fine_label_names'; found {sorted(meta)}")
    classes = [_text(x) for x in meta["fine_label_names"]]
    pixels, labels, names = read_batch(folder / split, labels_key="fine_labels", what="CIFAR-100 file")
    return SplitIndex(source=NAME, split=split, root=folder, ids=[f"{split}/{name}" for name in names],
                      labels=labels, clean_labels=labels.copy(), classes=classes,
                      pixels=np.ascontiguousarray(pixels))
