"""CIFAR-10, python version: 60,000 32x32 colour images in pickled batches.

::

    root/                        (or root itself holds the batches)
        cifar-10-batches-py/
            batches.meta         {b'label_names': [b'airplane', ...], ...}
            data_batch_1 ... 5   {b'data': (10000, 3072) uint8, b'labels': [...], b'filenames': [...]}
            test_batch

``data`` rows are channel-major (1024 red, 1024 green, 1024 blue values,
each row-major 32x32). Splits ``train`` (the 5 data batches) and ``test``;
ids ``train/<filename>``; labels are the original (clean) ones.

The batches are pickles, i.e. untrusted input that could run code: they are
read with an unpickler that only builds numpy arrays and plain containers.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.errors import DataError
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.extract.sources.common import data_root, no_split, require_file

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric  # type: ignore[no-redef]

NAME = "cifar10"
FOLDER = "cifar-10-batches-py"
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META = "batches.meta"

# The only globals a CIFAR batch needs: ndarray reconstruction as pickled by
# numpy 1.x / 2.x (protocols 2-5) and, for protocol-2 pickles written by
# Python 3, the bytes constructor. Everything else is refused.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, bytes and numbers; refuses any other global."""

    def __init__(self, file: Any, *, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refusing to load the global "
                            f"{module}.{name} (a CIFAR batch only holds numpy arrays and lists)") from None


def unpickle(path: Path, *, what: str = "CIFAR-10 batch") -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys; DataError for anything else."""
    with open(require_file(path, what), "rb") as f:
        try:
            obj = SafeUnpickler(f, path=path).load()
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed pickle is a data error
            raise DataError(f"{path} is not a readable CIFAR pickle: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_batch(path: Path, *, labels_key: str = "labels",
               what: str = "CIFAR-10 batch") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pixels (N, 32, 32, 3) uint8, labels (N,) int64, file names) of one batch (CIFAR-100's files:
    ``labels_key="fine_labels"``)."""
    batch = unpickle(path, what=what)
    missing = [k for k in ("data", labels_key, "filenames") if k not in batch]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; found {sorted(batch)}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a (N, 3072) uint8 array, found {shape}")
    n = len(data)
    if len(batch[labels_key]) != n or len(batch["filenames"]) != n:
        raise DataError(f"{path}: {n} images but {len(batch[labels_key])} {labels_key} and "
                        f"{len(batch['filenames'])} filenames")
    pixels = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    return pixels, np.asarray(batch[labels_key], dtype=np.int64), [_text(x) for x in batch["filenames"]]


def batches_dir(cfg: DataConfig) -> Path:
    root = data_root(cfg)
    return root / FOLDER if (root / FOLDER).is_dir() else root


def list_splits(cfg: DataConfig) -> list[str]:
    folder = batches_dir(cfg)
    return [s for s, files in BATCHES.items() if all((folder / f).is_file() for f in files)]


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    folder = batches_dir(cfg)
    available = list_splits(cfg)
    if split not in available:
        raise no_split(NAME, split, available, folder, needs=", ".join(BATCHES.get(split, [])))
    meta = unpickle(folder / META)
    if "label_names" not in meta:
        raise DataError(f"{folder / META}: missing key 'label_names'; found {sorted(meta)}")
    classes = [_text(x) for x in meta["label_names"]]
    parts = [read_batch(folder / f) for f in BATCHES[split]]
    pixels = np.ascontiguousarray(np.concatenate([p for p, _, _ in parts]))
    labels = np.concatenate([y for _, y, _ in parts])
    ids = [f"{split}/{name}" for _, _, names in parts for name in names]
    return SplitIndex(source=NAME, split=split, root=folder, ids=ids, labels=labels,
                      clean_labels=labels.copy(), classes=classes, pixels=pixels)
