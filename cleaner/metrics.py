"""Metrics of a head run: pure functions on arrays (scikit-learn does the maths)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``pred == labels``; (M,) each."""
    return float((pred == labels).mean()) if len(labels) else float("nan")


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    return confusion_matrix(labels, pred, labels=np.arange(num_classes)).astype(np.int64)


def detection(clean_score: np.ndarray, given: np.ndarray, clean: np.ndarray) -> dict[str, float] | None:
    """How well a clean score finds wrong labels, where the true label is known.

    Args:
        clean_score: (M,) higher = the given label looks right.
        given: (M,) labels as given (noisy). clean: (M,) true labels, -1 unknown.

    Returns ``{"auroc", "average_precision", "flipped", "known"}`` with
    "flipped" (given != clean) the positive class scored by ``-clean_score``,
    or None when no true label is known or only one class occurs.
    """
    known = clean >= 0
    flipped = given[known] != clean[known]
    if not known.any() or flipped.all() or not flipped.any():
        return None
    suspicion = -np.asarray(clean_score, dtype=np.float64)[known]
    return {
        "auroc": float(roc_auc_score(flipped, suspicion)),
        "average_precision": float(average_precision_score(flipped, suspicion)),
        "flipped": int(flipped.sum()),
        "known": int(known.sum()),
    }
