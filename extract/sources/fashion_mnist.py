"""Fashion-MNIST: 70,000 28x28 grey images of 10 clothing classes, IDX files.

::

    root/                           e.g. /usr/share/datasets/fashion-mnist (Debian)
        train-images-idx3-ubyte.gz  60,000 images
        train-labels-idx1-ubyte.gz
        t10k-images-idx3-ubyte.gz   10,000 images
        t10k-labels-idx1-ubyte.gz

Splits ``train`` and ``test``; the labels are the original (clean) ones. See
:mod:`mcpipe.extract.sources.idx` for the file format and other places found.
"""

from __future__ import annotations

from mcpipe.config import DataConfig
from mcpipe.extract.sources import idx
from mcpipe.extract.sources.base import SplitIndex

NAME = "fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def list_splits(cfg: DataConfig) -> list[str]:
    return idx.list_splits(cfg)


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    return idx.load_idx_split(cfg, split, source=NAME, classes=CLASSES)
