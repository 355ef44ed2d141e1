"""What ``mcpipe inspect`` shows about a store: pure functions of a FeatureStore."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from mcpipe.store.reader import FeatureStore
from mcpipe.store.schema import PROVENANCE_KEYS



def describe(store: FeatureStore) -> dict[str, Any]:
    """A JSON-able summary: sizes, classes with counts, clean-label knowledge, skips, provenance."""
    counts = np.bincount(store.labels, minlength=store.num_classes)
    known = store.clean_labels >= 0
    n = len(store.labels)
    summary: dict[str, Any] = {
        "path": str(store.path),
        "rows": store.num_rows,
        "usable_rows": n,
        "feature_dim": store.feature_dim,
        "dtype": store.dtype,
        "complete": store.complete,
        "num_classes": store.num_classes,
        "class_counts": {name: int(c) for name, c in zip(store.classes, counts)},
        "known_clean_fraction": float(known.mean()) if n else 0.0,
        "given_label_agreement": float((store.labels[known] == store.clean_labels[known]).mean()) if known.any()
        else None,
        "skipped": len(store.skipped),
        "skipped_by_reason": dict(Counter(reason for _, reason in store.skipped)),
        "skipped_examples": [{"id": i, "reason": r} for i, r in store.skipped[:10]],
        "provenance": {k: store.attrs.get(k) for k in (*PROVENANCE_KEYS, "schema_version")},
        "image_paths": store.has_paths,  # the store records each row's image file (mcpipe import)
    }
    if store.verified is not None:
        v = store.verified
        summary["verified"] = {"correct": int((v == 1).sum()), "wrong": int((v == 0).sum()),
                               "unverified": int((v < 0).sum())}
    return summary
