"""The one way to open a feature store: validate everything, then load it.

``open_store`` refuses, with a message naming the problem, a file that is not
HDF5, lacks a dataset, has another schema version, inconsistent shapes or
dtypes, labels outside the class list, NaN/inf features, or unfinished rows
(unless ``allow_incomplete``). Skipped images are left out of what it returns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mcpipe.errors import DataError
from mcpipe.store.schema import FEATURE_DTYPES, REQUIRED_ATTRS, REQUIRED_DATASETS, SCHEMA_VERSION, SKIP_REASONS

_SCAN_ROWS = 16384  # rows per block when loading / scanning features (64 MiB at 2048-d float16)
# HDF5's "unable to lock file" / "file locking ..." -- a word of its own: a truncated file's
# message holds "sblock->base_addr", which is no lock at all
_LOCK_WORD = re.compile(r"\block", re.IGNORECASE)


def is_lock_error(exc: OSError) -> bool:
    """Whether h5py failed to open a file because another process holds its lock."""
    return isinstance(exc, BlockingIOError) or bool(_LOCK_WORD.search(str(exc)))


@dataclass
class FeatureStore:
    """A validated store in memory (rows that were skipped or not written are left out).

    Attributes:
        features: (M, D) float16 | float32, M = usable rows; None if opened with ``load_features=False``.
        labels: (M,) int64 given labels. clean_labels: (M,) int64, -1 unknown.
        ids: M strings. rows: (M,) int64 row numbers in the file.
        has_paths: the file records each row's image path (``read_paths`` reads them).
        classes: class names. attrs: provenance attributes.
        num_rows: N rows in the file. skipped: [(id, reason)] of images that could not be read.
    """

    path: Path
    features: np.ndarray | None
    labels: np.ndarray
    clean_labels: np.ndarray
    ids: list[str]
    rows: np.ndarray
    classes: list[str]
    attrs: dict[str, Any]
    num_rows: int
    feature_dim: int
    dtype: str
    complete: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)
    verified: np.ndarray | None = None
    has_paths: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return json.loads(self.attrs["preprocessing"])


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _refuse(path: Path, problem: str) -> DataError:
    return DataError(f"store {path} {problem}")


def _check_layout(path: Path, f: h5py.File) -> None:
    missing = [d for d in REQUIRED_DATASETS if d not in f]
    if missing:
        raise _refuse(path, f"lacks dataset(s) {', '.join(missing)}; is it a feature store written by mcpipe extract?")
    version = _attr(f.attrs.get("schema_version"))
    if version != SCHEMA_VERSION:
        raise _refuse(path, f"has schema version {version}, this mcpipe reads version {SCHEMA_VERSION}")
    missing = [a for a in REQUIRED_ATTRS if a not in f.attrs]
    if missing:
        raise _refuse(path, f"lacks attribute(s) {', '.join(missing)}")
    feats = f["features"]
    if feats.ndim != 2 or feats.dtype.name not in FEATURE_DTYPES:
        raise _refuse(path, f"has features of shape {feats.shape} and dtype {feats.dtype}; expected (N, D) "
                            f"{' or '.join(FEATURE_DTYPES)}")
    n = feats.shape[0]
    expected = {"labels": np.int64, "clean_labels": np.int64, "written": np.bool_, "skipped": np.uint8}
    for name, dtype in expected.items():
        ds = f[name]
        if ds.shape != (n,) or ds.dtype != dtype:
            raise _refuse(path, f"has {name} of shape {ds.shape} and dtype {ds.dtype}; expected ({n},) "
                                f"{np.dtype(dtype).name}")
    for name in ("ids", "paths"):  # paths: optional (mcpipe import), absent from older stores
        if name in f and (f[name].shape != (n,) or h5py.check_string_dtype(f[name].dtype) is None):
            raise _refuse(path, f"has {name} of shape {f[name].shape} and dtype {f[name].dtype}; "
                                f"expected ({n},) strings")


def open_store(path: str | Path, *, allow_incomplete: bool = False, load_features: bool = True) -> FeatureStore:
    """Open, validate and load the store at ``path``; see the module docstring."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"store {path} does not exist (run mcpipe extract first?)")
    if path.is_dir():
        raise DataError(f"store {path} is a folder; pass one split's file, e.g. {path / 'train.h5'}")
    if not h5py.is_hdf5(path):
        raise _refuse(path, "is not an HDF5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        if is_lock_error(exc):
            raise _refuse(path, "is being written by another process; wait for it to finish") from None
        raise _refuse(path, f"cannot be read: {exc}") from None
    with f:
        _check_layout(path, f)
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        classes = [str(c) for c in attrs["class_names"]]
        written = f["written"][:]
        skipped_codes = f["skipped"][:]
        complete = bool(attrs["complete"]) and bool(written.all())
        if not complete and not allow_incomplete:
            raise _refuse(path, f"is incomplete: {int(written.sum())} of {len(written)} rows written; "
                                "run the same mcpipe extract command again to finish it")
        if skipped_codes.max(initial=0) >= len(SKIP_REASONS):
            raise _refuse(path, f"has an unknown skip code {int(skipped_codes.max())}")
        labels = f["labels"][:]
        clean = f["clean_labels"][:]
        k = len(classes)
        if k == 0:
            raise _refuse(path, "has no class names")
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise _refuse(path, f"has labels in [{labels.min()}, {labels.max()}] but {k} classes")
        if clean.size and (clean.min() < -1 or clean.max() >= k):
            raise _refuse(path, f"has clean labels in [{clean.min()}, {clean.max()}] but {k} classes")
        ids_all = f["ids"].asstr()[:]
        good = written & (skipped_codes == 0)
        rows = np.flatnonzero(good)
        features = _load_features(path, f["features"], rows) if load_features else None
        verified = f["verified"][:][rows] if "verified" in f else None
        skipped = [(str(ids_all[i]), SKIP_REASONS[c]) for i, c in enumerate(skipped_codes) if c]
        return FeatureStore(
            path=path, features=features, labels=labels[rows], clean_labels=clean[rows],
            ids=[str(x) for x in ids_all[rows]], rows=rows, classes=classes, attrs=attrs,
            num_rows=len(written), feature_dim=int(f["features"].shape[1]), dtype=f["features"].dtype.name,
            complete=complete, skipped=skipped, verified=verified, has_paths="paths" in f,
        )


def read_paths(store: FeatureStore) -> list[str] | None:
    """The image path of each usable row ("" where none is known), or None for a store that records none.

    Read on demand, not by ``open_store``: only the report's contact sheet needs them."""
    if not store.has_paths:
        return None
    try:
        with h5py.File(store.path, "r") as f:
            return [str(p) for p in f["paths"].asstr()[:][store.rows]]
    except (OSError, KeyError) as exc:
        raise _refuse(store.path, f"cannot be read: {exc}") from None


def read_features(source: FeatureStore | FeatureRows) -> np.ndarray:
    """(M, D) usable feature rows of a store opened with ``load_features=False``, checked as by ``open_store``."""
    rows = source if isinstance(source, FeatureRows) else FeatureRows(source)
    with rows.file() as f:
        return _load_features(rows.path, f["features"], rows.rows)


class FeatureRows:
    """A store's usable feature rows, read from its file one slice at a time.

    Stands in for the (M, D) array ``FeatureStore.features`` where work must not hold
    all of it: ``len``, ``shape``, ``dtype`` and contiguous row slices ``[a:b]`` (rows
    that were skipped or not written are left out, as in ``open_store``). Slices with
    NaN or inf values are refused like ``open_store`` refuses them.
    """

    def __init__(self, store: FeatureStore):
        self.path, self.rows = store.path, np.asarray(store.rows, dtype=np.int64)
        self.shape = (len(self.rows), store.feature_dim)
        self.dtype = np.dtype(store.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def file(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as exc:
            raise _refuse(self.path, f"cannot be read: {exc}") from None

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"FeatureRows takes contiguous row slices, got {key!r}")
        rows = self.rows[key]
        if not len(rows):
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        with self.file() as f:
            block = f["features"][rows[0]:rows[-1] + 1]
        if len(block) != len(rows):
            block = block[rows - rows[0]]
        _check_finite(self.path, block, rows)
        return block


def _check_finite(path: Path, block: np.ndarray, rows: np.ndarray) -> None:
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        row = int(rows[np.flatnonzero(~finite)[0]])
        raise _refuse(path, f"has NaN or infinite features (first at row {row}); re-extract it")


def _load_features(path: Path, ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read ``rows`` of ``ds`` block by block, refusing NaN or inf values."""
    n = ds.shape[0]
    out = np.empty((len(rows), ds.shape[1]), dtype=ds.dtype)
    all_rows = len(rows) == n
    pos = 0
    for start in range(0, n, _SCAN_ROWS):
        stop = min(start + _SCAN_ROWS, n)
        block = ds[start:stop]
        sel = np.arange(stop - start) if all_rows else rows[(rows >= start) & (rows < stop)] - start
        if not all_rows:
            block = block[sel]
        _check_finite(path, block, start + sel)
        out[pos:pos + len(block)] = block
        pos += len(block)
    return out
