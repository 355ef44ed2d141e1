"""MNIST: 70,000 28x28 grey images of handwritten digits, IDX files.

::

    root/
        train-images-idx3-ubyte[.gz]   60,000 images
        train-labels-idx1-ubyte[.gz]
        t10k-images-idx3-ubyte[.gz]    10,000 images
        t10k-labels-idx1-ubyte[.gz]

Splits ``train`` and ``test``; classes ``"0"`` ... ``"9"``; the labels are the
original (clean) ones. See :mod:`mcpipe.extract.sources.idx` for the format.
"""

from __future__ import annotations

from mcpipe.config import DataConfig
from mcpipe.extract.sources import idx
from mcpipe.extract.sources.base import SplitIndex

NAME = "mnist"
CLASSES = [str(d) for d in range(10)]


def list_splits(cfg: DataConfig) -> list[str]:
    return idx.list_splits(cfg)


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    return idx.load_idx_split(cfg, split, source=NAME, classes=CLASSES)
