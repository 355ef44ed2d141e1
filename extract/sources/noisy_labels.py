"""Human label sets for the CIFAR training images: CIFAR-10N and CIFAR-100N.

``data.noisy_labels`` names the release's file (``CIFAR-10_human.pt`` or
``CIFAR-100_human.pt``, a path, relative to ``data.root`` unless absolute):
a ``torch.save``d dict of 50,000-long integer arrays aligned with the
python-version training order (``cifar10``/``cifar100`` sources keep it).
``data.label_set`` picks the labels the training split gets:

* CIFAR-10N: ``aggre`` (``aggre_label``), ``worst`` (``worse_label``),
  ``random1`` ... ``random3`` (``random_label1`` ... ``3``);
* CIFAR-100N: ``noisy`` (``noisy_label``).

The file's ``clean_label`` becomes the split's clean labels and must equal
the labels of the data set itself, which catches a file of the other data set
or another order. The file is read with ``torch.load(weights_only=True)``,
allowing numpy's array reconstruction and nothing else.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mcpipe.errors import ConfigError, DataError
from mcpipe.extract.sources.base import SplitIndex

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

LABEL_SETS = {"aggre": "aggre_label", "worst": "worse_label", "random1": "random_label1",
              "random2": "random_label2", "random3": "random_label3", "noisy": "noisy_label"}
SPLIT = "train"

# what a dict of numpy integer arrays pickles, under numpy 1.x and 2.x names
_SAFE = [(_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
         (_multiarray._reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
         *[getattr(np.dtypes, n) for n in ("Int64DType", "Int32DType", "Int16DType", "Int8DType", "UInt8DType")
           if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]]


def label_file(root: str, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else Path(root).expanduser() / path


def read_label_sets(path: Path) -> dict[str, np.ndarray]:
    """The file's arrays by key (int64); DataError for anything that is not such a file."""
    if not path.is_file():
        raise DataError(f"data.noisy_labels: {path} does not exist (CIFAR-10_human.pt / CIFAR-100_human.pt)")
    try:
        with torch.serialization.safe_globals(_SAFE):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not torch, or pickling another object
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.noisy_labels: {path} is not a label file of integer arrays ({first[:200]})") from None
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"data.noisy_labels: {path} holds {type(obj).__name__}, not a dict of label arrays")
    out = {}
    for key, value in obj.items():
        arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"data.noisy_labels: {path}: {key!r} is not a 1-d integer array")
        out[str(key)] = arr.astype(np.int64)
    return out


def apply_label_set(index: SplitIndex, noisy_labels: str, label_set: str, root: str) -> SplitIndex:
    """``index`` (the training split) with the label set's labels and the file's clean labels."""
    if index.split != SPLIT:
        return index
    if label_set not in LABEL_SETS:
        raise ConfigError(f"data.label_set = {label_set!r} is invalid: expected one of {', '.join(LABEL_SETS)} "
                          "(aggre, worst, random1-3: CIFAR-10N; noisy: CIFAR-100N)")
    path = label_file(root, noisy_labels)
    sets = read_label_sets(path)
    key = LABEL_SETS[label_set]
    for need in (key, "clean_label"):
        if need not in sets:
            raise DataError(f"data.noisy_labels: {path} has no {need!r} (data.label_set = {label_set!r}); "
                            f"it has {', '.join(sorted(sets))}")
    n, c = len(index), len(index.classes)
    labels, clean = sets[key], sets["clean_label"]
    if len(labels) != n or len(clean) != n:
        raise DataError(f"data.noisy_labels: {path} labels {len(labels)} images, the {index.source} "
                        f"{SPLIT!r} split has {n}")
    if labels.min() < 0 or labels.max() >= c:
        raise DataError(f"data.noisy_labels: {path}: {key!r} holds labels outside 0..{c - 1} ({c} classes)")
    if not np.array_equal(clean, index.labels):
        raise DataError(f"data.noisy_labels: {path}: its clean_label differs from the {index.source} labels on "
                        f"{int((clean != index.labels).sum())} of {n} images: a file of another data set or order")
    return replace(index, labels=labels, clean_labels=clean.copy())
