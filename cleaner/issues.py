"""The second round's bookkeeping: which given labels to distrust, and the label set trained on next.

Label issues are found by confident learning (Northcutt et al., JAIR 2021) as
cleanlab implements it (``cleanlab.filter.find_label_issues``, "prune by noise
rate"): per-class thresholds t_j = the mean predicted probability of class j
over the images labelled j, a confident joint of given vs likely true class,
and per off-diagonal cell as many images removed as it estimates, those with
the largest margin first. Per-class thresholds matter under structured noise:
when 40 % of a class's images carry the next class's label, one global
threshold on p(given) misses them or floods the other classes with false
alarms. The probabilities must be out of sample (cross-validated): a model
that trained on a label tends to agree with it.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

ACTIONS = ("drop", "relabel")


def find_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(M,) given labels, (M, C) out-of-sample probabilities -> (M,) bool, True = label likely wrong."""
    from cleanlab.filter import find_label_issues

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != len(y):
        raise ValueError(f"probs must be ({len(y)}, C), got {p.shape}")
    p = p / p.sum(1, keepdims=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        issues = find_label_issues(y, p, filter_by="prune_by_noise_rate", n_jobs=1)
    for w in caught:
        log.debug("cleanlab: %s", w.message)
    return np.asarray(issues, dtype=bool)


def cleaned(labels: np.ndarray, probs: np.ndarray, issues: np.ndarray, action: str) -> tuple[np.ndarray, np.ndarray]:
    """The label set of the second round: (labels (M,) int64, row weights (M,) float32).

    ``drop``: flagged rows keep their label and get weight 0 (not trained on);
    ``relabel``: flagged rows take the most probable class, weight 1.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    y = np.array(labels, dtype=np.int64, copy=True)
    w = np.ones(len(y), dtype=np.float32)
    if action == "drop":
        w[issues] = 0.0
    else:
        y[issues] = np.asarray(probs)[issues].argmax(1)
    return y, w


def noise_matrix(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C, C) estimated P(given = g | true = t), row t, from out-of-sample probabilities (cleanlab's
    calibrated confident joint). A class no image is estimated to truly belong to keeps its identity row."""
    from cleanlab.count import estimate_joint

    p = np.asarray(probs, dtype=np.float64)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        joint = estimate_joint(np.asarray(labels, dtype=np.int64), p / p.sum(1, keepdims=True))  # [given, true]
    mass = joint.sum(0)
    t = np.eye(len(mass))
    seen = mass > 0
    t[seen] = (joint[:, seen] / mass[seen]).T
    return t


def corrected_gain(noise: np.ndarray) -> np.ndarray:
    """(C, C) gain[p, g] whose mean over rows (prediction p, given label g) estimates accuracy against the true
    labels, when given labels are drawn from ``noise`` (row t = P(given | true = t)) independently of the image.

    With M[p, g] the share of rows predicted p and labelled g, E[M] = A T (A[p, t]: predicted p, truly t), so
    accuracy = trace(A) = trace(M T^-1) = sum_{p, g} M[p, g] T^-1[g, p]: gain = (T^-1)^T (pseudo-inverse, so a
    singular estimate cannot fail). Without noise T = I and this is plain accuracy; under uniform flips it is
    an increasing affine function of accuracy against the given labels (the same choice); under structured
    flips (class c -> c + 1) it stops rewarding the confusions the flips themselves create.
    """
    return np.linalg.pinv(np.asarray(noise, dtype=np.float64)).T
