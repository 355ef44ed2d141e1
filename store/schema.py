"""The feature store's on-disk schema (one HDF5 file per split).

Datasets (N rows, D feature dims):

* ``features``     (N, D) float16 | float32, chunked by rows -- pooled backbone features
* ``labels``       (N,) int64 -- labels as given (noisy)
* ``clean_labels`` (N,) int64 -- true labels where known, -1 unknown
* ``ids``          (N,) utf-8 strings -- image path relative to the data root, or the data set's key
* ``written``      (N,) bool -- rows whose block is finished (resume skips them)
* ``skipped``      (N,) uint8 -- 0 = image read fine, else an index into ``SKIP_REASONS``;
  a skipped row is written (it will not be retried) but holds zeros and is
  left out by the reader
* ``verified``     (N,) int8, optional -- human verification (1 right, 0 wrong, -1 not verified)
* ``paths``        (N,) utf-8 strings, optional -- each row's image file as an absolute path ("" = none
  known); written by ``mcpipe import`` when its input names the images, read by the report's contact
  sheet. Extracted stores do not need it: their ids are paths relative to the ``data_root`` attribute.

Attributes: ``schema_version``, :class:`Provenance`'s fields, ``block_rows`` (rows per written block, the
resume unit), ``complete`` (every row written); extract adds ``config_toml`` and ``created_unix``, import
``import_sources``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1

FEATURE_DTYPES = ("float16", "float32")

# index = the code stored in ``skipped``; 0 means "not skipped"
SKIP_REASONS = ("", "missing", "empty", "truncated", "corrupt", "too_large", "unreadable")

REQUIRED_DATASETS = ("features", "labels", "clean_labels", "ids", "written", "skipped")



@dataclass(frozen=True)
class Provenance:
    """Where a store's features come from: its provenance attributes, one definition for every writer
    (extract, import, the synthetic test stores) and reader (inspect, head.pt, the kNN cache)."""

    mcpipe_version: str
    dataset: str                 # data source name ("imported", "clip-retrieval", "synthetic" for the others)
    split: str
    class_names: list[str]
    backbone: str
    weights: str                 # as configured (DEFAULT, a torchvision name, a path, none)
    weights_sha256: str          # of the weights actually loaded ("" for random init)
    random_init: bool
    image_size: int
    preprocessing: str           # JSON, the eval transform (resize, crop, mean, std, interpolation)
    precision: str               # fp32, bf16, or the imported arrays' dtypes
    device: str
    data_root: str
    source_fingerprint: str      # sha256 of ids + labels + clean labels + classes
    config_fingerprint: str      # sha256 of everything that changes feature values

    def attrs(self) -> dict[str, Any]:
        """The HDF5 attributes (class names as an array of strings)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["class_names"] = np.array(self.class_names, dtype=h5py.string_dtype())
        out["random_init"] = bool(self.random_init)
        return out


# what inspect shows and head.pt records of a store (its class names are listed apart)
PROVENANCE_KEYS = tuple(f.name for f in fields(Provenance) if f.name != "class_names")

# attributes every store has (older stores may lack precision, device and data_root)
REQUIRED_ATTRS = ("schema_version", *(k for k in ("class_names", *PROVENANCE_KEYS)
                                      if k not in ("precision", "device", "data_root")), "block_rows", "complete")
