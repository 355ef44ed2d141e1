"""The validation hold-out every choice of ``mcpipe train-head`` is made on (pure numpy, no I/O)."""

from __future__ import annotations

import numpy as np


def stratified_holdout(labels: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
    """The rows to hold out of training for validation: (N,) given labels -> (M,) sorted int64 rows.

    Each class (by the labels as given, noisy or not) with n >= 2 rows gives round(fraction * n) of them,
    at least 1 and at most n - 1, so every such class is in both parts; a class with < 2 rows stays in
    training whole. Which rows depends on (labels, fraction, seed) only, each class on its own rows only:
    every process and every resumed run holds out the same ones. ``fraction`` = 0: none.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,), got shape {labels.shape}")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction = {fraction!r} is invalid: expected a number in [0, 1)")
    if fraction == 0 or len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    held = []
    for c, rows in zip(classes, np.split(order, starts[1:])):
        if len(rows) < 2:
            continue
        k = min(len(rows) - 1, max(1, int(np.floor(fraction * len(rows) + 0.5))))
        held.append(np.random.default_rng([seed, 0x5EED, int(c)]).choice(rows, size=k, replace=False))
    return np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, dtype=np.int64)


def holdout(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to train on, rows held out for validation), each sorted int64: :func:`stratified_holdout` and the rest."""
    val = stratified_holdout(labels, fraction, seed=seed)
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val


def folds(labels: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """(M,) fold number in [0, k) per row, stratified by label: each class dealt round-robin in random order."""
    y = np.asarray(labels)
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    rng = np.random.default_rng([seed % (1 << 63), 0xF01D])
    out = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        out[rows] = (np.arange(len(rows)) + offset) % k
        offset += len(rows)  # small classes do not all start in fold 0
    return out
