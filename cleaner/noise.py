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
* ``instance`` -- human-like, instance-dependent noise: exactly round(r * M)
  samples flip, mostly those that look most like another class, each to the
  class it looks most like. Needs the (M, D) training features.

``instance`` in detail. Features are standardised per dimension (mean, std over
the M rows: the geometry the head's classifier sees) and each row is L2-normalised
to z_i; class centroids mu_c are the normalised means of z over the *true*
labels. Image i's nearest other class is j*(i) = argmax_{c != y_i} cos(z_i, mu_c)
and its margin m_i = cos(z_i, mu_j*) - cos(z_i, mu_{y_i}), in [-2, 2]: the
larger, the more the image looks like j* rather than its own class. The
round(r * M) flipped images are drawn without replacement with probability
proportional to exp(m_i / T), T = std(m) / 2 (uniform if every margin is equal);
each gets label j*(i). T relative to the spread of m makes the noise the same
whatever the backbone's cosine scale: one std more margin makes an image e^2 ~ 7.4
times likelier to be picked, so flips concentrate on ambiguous images (for
normal margins and a small rate they come from around mean + 2 std) without
being the deterministic top of the ranking. The draw is Gumbel top-k (the k
largest m_i / T + Gumbel noise), exactly sequential sampling without replacement
in O(M). Standardising first matters: pooled ReLU features are all positive, so
raw cosines are all high and alike. Features are read in blocks of rows (three
passes: moments, centroids, cosines), never copied whole.

All kinds are deterministic in ``seed`` and never modify their input.
"""

from __future__ import annotations

from typing import get_args

import numpy as np

from mcpipe.config import NoiseConfig, NoiseKind
from mcpipe.errors import ConfigError

KINDS = get_args(NoiseKind)
_ROW_SUM_TOL = 1e-6
_TEMPERATURE_PER_STD = 0.5  # instance: T = 0.5 * std(margin)
_MIN_STD = 1e-6  # floor of a dimension's std, as the head's standardisation
_BLOCK_ROWS = 4096  # instance: feature rows per block (32 MiB of float32 at 2048-d)


def apply_noise(labels: np.ndarray, num_classes: int, *, kind: str, rate: float = 0.0, seed: int = 0,
                matrix=None, features: np.ndarray | None = None) -> np.ndarray:
    """Noisy copy of ``labels``.

    Args:
        labels: (M,) integer labels in [0, num_classes).
        num_classes: C.
        kind: none, symmetric, pairflip, matrix or instance (see the module docstring).
        rate: fraction of samples flipped, in [0, 1) (symmetric, pairflip, instance).
        seed: seed of the numpy Generator that picks the flips.
        matrix: (C, C) row-stochastic transition matrix (kind = matrix).
        features: (M, D) float16 / float32 features of the M samples, row i for labels[i]
            (kind = instance; ignored otherwise). Read in blocks, never modified.

    Returns:
        (M,) int64 noisy labels.
    """
    y = _check_labels(labels, num_classes)
    if kind not in KINDS:
        raise ConfigError(f"noise.kind = {kind!r} is invalid: expected one of {', '.join(KINDS)}")
    if kind == "none":
        return y
    if kind == "instance" and features is None:
        raise ConfigError("noise.kind = instance needs the training features to find each image's nearest other "
                          "class: use it with mcpipe train-head (finetune has no features and cannot use it)")
    rng = np.random.default_rng(seed)
    if kind == "matrix":
        return _transition(y, _check_matrix(matrix, num_classes), rng)
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"noise.rate = {rate!r} is invalid: expected a number in [0, 1)")
    if num_classes < 2:
        raise ConfigError(f"noise.kind = {kind} needs at least 2 classes to flip labels, got {num_classes}")
    if kind == "instance":
        return _instance(y, num_classes, _check_features(features, len(y)), int(round(rate * len(y))), rng)
    flip = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
    if kind == "symmetric":
        # adding 1..C-1 (mod C) is a uniform draw from the other classes
        y[flip] = (y[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
    else:
        y[flip] = (y[flip] + 1) % num_classes
    return y


def noise_from_config(labels: np.ndarray, num_classes: int, cfg: NoiseConfig,
                      features: np.ndarray | None = None) -> np.ndarray:
    """``apply_noise`` with the options of a ``[noise]`` config table; ``features`` (M, D) for kind = instance."""
    matrix = cfg.matrix if cfg.kind == "matrix" else None
    return apply_noise(labels, num_classes, kind=cfg.kind, rate=cfg.rate, seed=cfg.seed, matrix=matrix,
                       features=features)


def instance_margins(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                     block: int = _BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's nearest other class by centroid and its margin towards it (module docstring).

    Args:
        features: (M, D) float features, row i for labels[i]; read ``block`` rows at a time.
        labels: (M,) int64 true labels in [0, C): they define the centroids.
        num_classes: C; at least two classes must have samples.

    Returns:
        nearest: (M,) int64 j*(i) = argmax over classes c != labels[i] with samples of cos(z_i, mu_c).
        margin: (M,) float64 cos(z_i, mu_j*) - cos(z_i, mu_{labels[i]}), in [-2, 2].
    """
    present = np.bincount(labels, minlength=num_classes) > 0
    if present.sum() < 2:
        raise ConfigError(f"noise.kind = instance needs samples of at least 2 classes, got only class "
                          f"{np.flatnonzero(present)[0]}")
    mean, std = _moments(features, block)
    sums = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    for start, z in _unit_rows(features, mean, std, block):
        yb = labels[start:start + len(z)]
        order = np.argsort(yb, kind="stable")
        classes, first = np.unique(yb[order], return_index=True)
        sums[classes] += np.add.reduceat(z[order], first, axis=0, dtype=np.float64)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    centroids = (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    nearest = np.empty(len(labels), dtype=np.int64)
    margin = np.empty(len(labels), dtype=np.float64)
    for start, z in _unit_rows(features, mean, std, block):
        rows, yb = np.arange(len(z)), labels[start:start + len(z)]
        cos = z @ centroids.T  # (B, C)
        own = cos[rows, yb].astype(np.float64)
        cos[:, ~present] = -np.inf
        cos[rows, yb] = -np.inf
        j = cos.argmax(axis=1)
        nearest[start:start + len(z)] = j
        margin[start:start + len(z)] = cos[rows, j] - own
    return nearest, margin


def _instance(y: np.ndarray, num_classes: int, x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Flip ``k`` labels to their nearest other class, drawn with probability ~ exp(margin / T)."""
    if k == 0:
        return y
    nearest, margin = instance_margins(x, y, num_classes)
    keys = rng.gumbel(size=len(y))  # Gumbel top-k: sampling without replacement, p ~ exp(margin / T)
    spread = margin.std()
    if spread > 0:
        keys += margin / (_TEMPERATURE_PER_STD * spread)
    flip = np.argpartition(-keys, k - 1)[:k]
    y[flip] = nearest[flip]
    return y


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


def _check_features(features, m: int) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] != m or x.shape[1] < 1:
        raise ValueError(f"features have shape {x.shape}; expected (M, D) = ({m}, D >= 1), one row per label")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"features have dtype {x.dtype}; expected float16 or float32")
    return x


def _moments(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(D,) float32 mean and std of (M, D) ``x``, float64 sums over blocks of rows shifted by row 0."""
    shift = x[0].astype(np.float64)  # shifting keeps E[x^2] - E[x]^2 from cancelling
    total = np.zeros(x.shape[1], dtype=np.float64)
    squares = np.zeros_like(total)
    for start in range(0, len(x), block):
        part = x[start:start + block].astype(np.float64)
        part -= shift
        total += part.sum(axis=0)
        squares += np.einsum("ij,ij->j", part, part)
    if not (np.isfinite(total).all() and np.isfinite(squares).all()):
        raise ValueError("features have NaN or infinite entries; expected finite numbers")
    mean = total / len(x)
    std = np.sqrt(np.maximum(squares / len(x) - mean * mean, 0.0))
    return (mean + shift).astype(np.float32), np.maximum(std, _MIN_STD).astype(np.float32)


def _unit_rows(x: np.ndarray, mean: np.ndarray, std: np.ndarray, block: int):
    """Yield (start, (B, D) float32 standardised, L2-normalised rows) over blocks of ``x``."""
    for start in range(0, len(x), block):
        z = x[start:start + block].astype(np.float32)
        z -= mean
        z /= std
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), np.float32(1e-12))
        yield start, z
