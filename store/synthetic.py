"""Synthetic feature stores: class-clustered features for tests and speed benchmarks.

Features are ``relu(center[label] + spread * noise)``; with a small ``spread``
the classes are separable, like good backbone features. Real stores come from
``mcpipe extract``; these exist so the head can be tested and timed at any size.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from mcpipe.store.schema import Provenance
from mcpipe.store.writer import StoreSpec, StoreWriter


def write_synthetic_store(path: str | Path, rows: int, dim: int, classes: int, *, seed: int = 0,
                          spread: float = 1.5, split: str = "train", block_rows: int = 65536,
                          dtype: str = "float16") -> Path:
    """Write a complete store of ``rows`` x ``dim`` features in ``classes`` clusters; returns its path.

    Stores written with the same ``(rows, dim, classes, seed)`` but another
    ``split`` share the class centers (a train/test pair), not the samples.
    """
    path = Path(path)
    centers = np.random.default_rng(seed).standard_normal((classes, dim)).astype(np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    labels = rng.integers(0, classes, rows)
    spec = StoreSpec(
        ids=[f"synthetic/{split}/{i:07d}" for i in range(rows)], labels=labels, clean_labels=labels.copy(),
        feature_dim=dim, dtype=dtype, block_rows=block_rows, chunk_rows=256,
        attrs=Provenance(
            mcpipe_version="synthetic", dataset="synthetic", split=split,
            class_names=[f"class{c}" for c in range(classes)], backbone="synthetic", weights="none", weights_sha256="",
            random_init=True, image_size=0, preprocessing="{}", precision="fp32", device="cpu", data_root="",
            source_fingerprint=f"synthetic-{split}-{rows}-{dim}-{seed}",
            config_fingerprint=f"synthetic-{classes}-{spread}-{dtype}").attrs())
    with StoreWriter.open(path, spec, overwrite=True, sync_seconds=60) as w:
        for b in w.pending_blocks():
            lo, hi = w.block_range(b)
            x = centers[labels[lo:hi]] + spread * rng.standard_normal((hi - lo, dim), dtype=np.float32)
            w.write_block(b, np.maximum(x, 0), np.zeros(hi - lo, np.uint8))
    return path
