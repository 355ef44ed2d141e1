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

Attributes: see ``REQUIRED_ATTRS``.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

FEATURE_DTYPES = ("float16", "float32")

# index = the code stored in ``skipped``; 0 means "not skipped"
SKIP_REASONS = ("", "missing", "empty", "truncated", "corrupt", "too_large", "unreadable")

REQUIRED_DATASETS = ("features", "labels", "clean_labels", "ids", "written", "skipped")

REQUIRED_ATTRS = (
    "schema_version",    # int, SCHEMA_VERSION
    "mcpipe_version",    # str
    "dataset",           # str, data source name
    "split",             # str
    "class_names",       # list[str]
    "backbone",          # str
    "weights",           # str, as configured (DEFAULT, a torchvision name, a path, none)
    "weights_sha256",    # str, sha256 of the weights actually loaded ("" for random init)
    "random_init",       # bool
    "image_size",        # int
    "preprocessing",     # JSON str, the eval transform (resize, crop, mean, std, interpolation)
    "source_fingerprint",  # str, sha256 of ids + labels + clean labels + classes
    "config_fingerprint",  # str, sha256 of everything that changes feature values
    "block_rows",        # int, rows per written block (the resume unit)
    "complete",          # bool, every row written
)
