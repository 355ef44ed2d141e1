"""IDX files, the format of MNIST and Fashion-MNIST (shared by both sources).

::

    root/
        train-images-idx3-ubyte[.gz]    magic 2051, N, rows, cols, then N*rows*cols uint8
        train-labels-idx1-ubyte[.gz]    magic 2049, N, then N uint8
        t10k-images-idx3-ubyte[.gz]
        t10k-labels-idx1-ubyte[.gz]

The Debian package dataset-fashion-mnist installs the four .gz files as
above in ``/usr/share/datasets/fashion-mnist/``. Also found: the files in
``raw/`` or torchvision's ``MNIST/raw/`` / ``FashionMNIST/raw/``, and the
``train-images.idx3-ubyte`` spelling. Gzip is recognised by content, not by
name. Ids are ``train/00000`` ...; pixels are kept in memory.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.errors import DataError
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.extract.sources.common import data_root, no_split

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
PREFIX = {"train": "train", "test": "t10k"}
SUBFOLDERS = ("", "raw", "MNIST/raw", "FashionMNIST/raw")


def find_file(root: Path, prefix: str, kind: str) -> Path | None:
    """The first of ``<prefix>-<kind>-idxN-ubyte`` (or ``.idxN``, ``.gz``) under root's known folders."""
    dims = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte"]
    for sub in SUBFOLDERS:
        for name in names:
            for candidate in (root / sub / name, root / sub / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    return None


def split_files(root: Path, split: str) -> tuple[Path, Path] | None:
    images = find_file(root, PREFIX[split], "images")
    labels = find_file(root, PREFIX[split], "labels")
    return (images, labels) if images and labels else None


def list_splits(cfg: DataConfig) -> list[str]:
    root = data_root(cfg)
    return [s for s in PREFIX if split_files(root, s)]


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they are gzip data (whatever the name says)."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} cannot be read: {exc}") from None


def parse_idx(data: bytes, *, magic: int, where: Path) -> np.ndarray:
    """The uint8 array of an IDX file: (N,) labels (magic 2049) or (N, rows, cols) images (2051)."""
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: {len(data)} bytes, too short for an IDX header (expected {header})")
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        raise DataError(f"{where}: magic number {found}, expected {magic} "
                        f"({'images' if magic == IMAGES_MAGIC else 'labels'}, uint8, {ndim}-d)")
    shape = struct.unpack(f">{ndim}i", data[4:header])
    size = header + int(np.prod(shape))
    if len(data) != size:
        raise DataError(f"{where}: {len(data)} bytes, expected {size} for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_split(cfg: DataConfig, split: str, *, source: str, classes: list[str]) -> SplitIndex:
    root = data_root(cfg)
    files = split_files(root, split) if split in PREFIX else None
    if files is None:
        needs = f"{PREFIX[split]}-images-idx3-ubyte[.gz] and {PREFIX[split]}-labels-idx1-ubyte[.gz]" if split in PREFIX else ""
        raise no_split(source, split, list_splits(cfg), root, needs=needs)
    images_path, labels_path = files
    images = parse_idx(_read_bytes(images_path), magic=IMAGES_MAGIC, where=images_path)
    labels = parse_idx(_read_bytes(labels_path), magic=LABELS_MAGIC, where=labels_path).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    return SplitIndex(source=source, split=split, root=images_path.parent,
                      ids=[f"{split}/{i:05d}" for i in range(len(labels))], labels=labels,
                      clean_labels=labels.copy(), classes=list(classes), pixels=images)
