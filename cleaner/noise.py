"""Synthetic label noise, added in memory for experiments (the store is never touched).

Kinds (``NoiseConfig.kind``):

* ``none`` -- labels returned unchanged (a copy).
* ``symmetric`` -- the paper's "uniform flip at rate r": exactly round(r * M)
  samples, chosen uniformly without replacement, each get a label drawn
  uniformly from the *other* C - 1 classes.
* ``pairflip`` -- exactly round(r * M) samples move from class c to (c + 1) mod C.
* ``matrix`` -- every sample's label is redrawn from row T[y] of a C x C
  row-stochastic transition matrix (row = true class, column = given label);
  ``rate`` is not used.

All kinds are deterministic in ``seed`` and never modify their input.
"""

from __future__ import annotations

import numpy as np

from mcpipe.config import NoiseConfig
from mcpipe.errors import ConfigError

KINDS = ("none", "symmetric", "pairflip", "matrix")
_ROW_SUM_TOL = 1e-6


def apply_noise(labels: np.ndarray, num_classes: int, *, kind: str, rate: float = 0.0, seed: int = 0,
                matrix=None) -> np.ndarray:
    """Noisy copy of ``labels``.

    Args:
        labels: (M,) integer labels in [0, num_classes).
        num_classes: C.
        kind: none, symmetric, pairflip or matrix (see the module docstring).
        rate: fraction of samples flipped, in [0, 1) (symmetric, pairflip).
        seed: seed of the numpy Generator that picks the flips.
        matrix: (C, C) row-stochastic transition matrix (kind = matrix).

    Returns:
        (M,) int64 noisy labels.
    """
    y = _check_labels(labels, num_classes)
    if kind not in KINDS:
        raise ConfigError(f"noise.kind = {kind!r} is invalid: expected one of {', '.join(KINDS)}")
    if kind == "none":
        return y
    rng = np.random.default_rng(seed)
    if kind == "matrix":
        return _transition(y, _check_matrix(matrix, num_classes), rng)
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"noise.rate = {rate!r} is invalid: expected a number in [0, 1)")
    if num_classes < 2:
        raise ConfigError(f"noise.kind = {kind} needs at least 2 classes to flip labels, got {num_classes}")
    flip = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
    if kind == "symmetric":
        # adding 1..C-1 (mod C) is a uniform draw from the other classes
        y[flip] = (y[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
    else:
        y[flip] = (y[flip] + 1) % num_classes
    return y


def noise_from_config(labels: np.ndarray, num_classes: int, cfg: NoiseConfig) -> np.ndarray:
    """``apply_noise`` with the options of a ``[noise]`` config table."""
    matrix = cfg.matrix if cfg.kind == "matrix" else None
    return apply_noise(labels, num_classes, kind=cfg.kind, rate=cfg.rate, seed=cfg.seed, matrix=matrix)


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    y = np.array(labels, dtype=np.int64, copy=True)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-d array, got shape {y.shape}")
    if num_classes < 1:
        raise ConfigError(f"num_classes = {num_classes} is invalid: expected an integer >= 1")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels lie in [{y.min()}, {y.max()}], outside the {num_classes} classes [0, {num_classes})")
    return y


def _check_matrix(matrix, num_classes: int) -> np.ndarray:
    """(C, C) float64 transition matrix, or ConfigError naming what is wrong."""
    if matrix is None:
        raise ConfigError("noise.matrix is missing: kind = matrix needs a C x C row-stochastic matrix")
    try:
        t = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError("noise.matrix is invalid: rows of unequal length or non-numeric entries; "
                          f"expected a {num_classes} x {num_classes} row-stochastic matrix") from None
    c = num_classes
    if t.shape != (c, c):
        raise ConfigError(f"noise.matrix has shape {t.shape}; expected ({c}, {c}) for {c} classes")
    if not np.isfinite(t).all():
        raise ConfigError("noise.matrix has NaN or infinite entries; expected probabilities in [0, 1]")
    if (t < 0).any():
        r, col = np.argwhere(t < 0)[0]
        raise ConfigError(f"noise.matrix[{r}][{col}] = {t[r, col]} is negative; expected probabilities in [0, 1]")
    sums = t.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _ROW_SUM_TOL)
    if bad.size:
        raise ConfigError(f"noise.matrix row {bad[0]} sums to {sums[bad[0]]:.8g}; every row must sum to 1 "
                          f"(within {_ROW_SUM_TOL:g})")
    return t


def _transition(y: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Redraw each label from its row of ``t`` (one uniform per sample, inverse CDF per class)."""
    u = rng.random(len(y))
    out = np.empty_like(y)
    for c in np.unique(y):
        cdf = np.cumsum(t[c])
        cdf[np.flatnonzero(t[c])[-1]:] = np.inf  # rounding can never pick a zero-probability tail
        rows = np.flatnonzero(y == c)
        out[rows] = np.searchsorted(cdf, u[rows], side="right")  # side=right skips zero-probability columns
    return out
