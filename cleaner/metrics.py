"""Metrics of a head run: pure functions on arrays (scikit-learn does the maths)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score

from mcpipe.records import Detection


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``pred == labels``; (M,) each."""
    return float((pred == labels).mean()) if len(labels) else float("nan")


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    return confusion_matrix(labels, pred, labels=np.arange(num_classes)).astype(np.int64)


def label_truth(given: np.ndarray, clean: np.ndarray,
                verified: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where it is known whether a given label is right, and where it is known wrong.

    Args:
        given: (M,) labels as given. clean: (M,) true labels, -1 unknown.
        verified: (M,) int8 human check of the given label (1 right, 0 wrong, -1 not checked), or None.
            Used where the true label is unknown (Food-101N: a label checked wrong has no true label).

    Returns (known, wrong), (M,) bool each; ``wrong`` implies ``known``.
    """
    known = clean >= 0
    wrong = known & (given != clean)
    if verified is not None:
        checked = ~known & (verified >= 0)
        known = known | checked
        wrong = wrong | (checked & (verified == 0))
    return known, wrong


def detection(clean_score: np.ndarray, known: np.ndarray, wrong: np.ndarray, *,
              flag: int | None = None) -> Detection | None:
    """How well a clean score finds wrong labels, where it is known whether the label is right.

    Args:
        clean_score: (M,) higher = the given label looks right.
        known, wrong: (M,) bool, from :func:`label_truth`.
        flag: how many labels the run estimates wrong (e.g. confident learning's count): adds
            "f1_at_estimate", the F1 of flagging that many lowest-scored images (of all M), as SimiFeat
            and Docta report detection.

    Returns the AUROC and average precision with "flipped" (known wrong) the
    positive class scored by ``-clean_score``, and the counts, or None when
    nothing is known or only one class occurs.
    """
    flipped = wrong[known]
    if not known.any() or flipped.all() or not flipped.any():
        return None
    score = np.asarray(clean_score, dtype=np.float64)
    suspicion = -score[known]
    out = Detection(float(roc_auc_score(flipped, suspicion)), float(average_precision_score(flipped, suspicion)),
                    int(flipped.sum()), int(known.sum()))
    if flag is not None:
        flagged = np.zeros(len(score), dtype=bool)
        flagged[np.argsort(score, kind="stable")[:flag]] = True
        out.f1_at_estimate = float(f1_score(flipped, flagged[known], zero_division=0.0))
    return out
