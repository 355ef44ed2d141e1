"""FAISS k-nearest-neighbour graph of the training features (cosine), and its agreement score.

Two searches over L2-normalised features, self excluded:

* ``neighbours`` / ``similarity``: the k nearest rows of *any* label;
* ``same_label``: the k_same nearest rows among those with the same given label
  (each class searched on its own rows).

Up to ``exact_max`` rows the graph is exact (``faiss.knn``, inner product of
float32 unit vectors). Above it the search is approximate: features wider than
``PCA_DIM`` are projected by PCA (fitted on a seeded sample), searched in that
space (an ``IndexIVFFlat`` with nlist ~ 4 sqrt(n), nprobe raised until recall
against exact search on sample queries reaches ``RECALL_TARGET``; a class of at
most ``exact_max`` rows is searched exhaustively), and the ``RERANK`` x (k + 1)
candidates are re-scored by ``IndexRefine`` against float16 copies of the unit
vectors, so the similarities are cosines of the full features. Features are
converted block by block: besides the input matrix the approximate path holds
the float16 unit vectors (1x an (M, D) float16 matrix), the (M, 256) projection
and the IVF's copy of it -- never a float32 copy of the features.

``load_or_build`` caches the graph as ``<store stem>.knn-k<k>.npz`` beside the
store; see its docstring for the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from mcpipe.errors import DataError
from mcpipe.store.reader import FeatureStore

log = logging.getLogger(__name__)

EXACT_MAX = 20_000  # rows up to which the graph is exact (M^2 D flops: ~20 s at 20k x 2048 on 2 cores)
PCA_DIM = 256  # dimensions the approximate search runs in
PCA_TRAIN = 20_000  # rows the PCA is fitted on
RERANK = 3  # candidates per wanted neighbour re-scored with exact cosine
RECALL_TARGET = 0.95  # recall@k of the IVF against exhaustive search in the same space
_TUNE_QUERIES = 500  # queries that measure that recall
_TRAIN_PER_LIST = 32  # k-means training rows per inverted list
_BLOCK = 8192  # rows per block when converting features to float32
_CACHE_VERSION = 1


@dataclass
class KnnGraph:
    """Nearest neighbours of every usable row of a store (indices are rows of the store's arrays).

    Attributes:
        neighbours: (M, k) int64, nearest first, self excluded, -1 where fewer than k exist.
        similarity: (M, k) float32 cosine of those neighbours, NaN where the neighbour is -1.
        same_label: (M, k_same) int64 nearest neighbours carrying the same given label, -1 pad.
    """

    neighbours: np.ndarray
    similarity: np.ndarray
    same_label: np.ndarray


def build_knn(features: np.ndarray, labels: np.ndarray, *, k: int = 10, k_same: int | None = None,
              exact_max: int = EXACT_MAX, seed: int = 0) -> KnnGraph:
    """The kNN graph of ``features`` (M, D) float16 | float32 with given ``labels`` (M,); see the module docstring."""
    labels = _check_inputs(features, labels, k)
    k_same = k if k_same is None else k_same
    if k_same < 1:
        raise ValueError(f"k_same must be >= 1, got {k_same}")
    start = time.perf_counter()
    search = _Searcher(features, exact_max=exact_max, seed=seed)
    neighbours, similarity = search(np.arange(len(labels)), k)
    same = _same_label(search, labels, k_same)
    log.info("kNN graph of %d rows (k=%d, %s) in %.1f s", len(labels), k,
             "exact" if search.exact else "approximate", time.perf_counter() - start)
    return KnnGraph(neighbours=neighbours, similarity=similarity, same_label=same)


def same_label_knn(features: np.ndarray, labels: np.ndarray, *, k: int = 10, exact_max: int = EXACT_MAX,
                   seed: int = 0) -> np.ndarray:
    """Only ``KnnGraph.same_label`` of ``build_knn``: (M, k) int64, -1 pad."""
    labels = _check_inputs(features, labels, k)
    return _same_label(_Searcher(features, exact_max=exact_max, seed=seed), labels, k)


def agreement(graph: KnnGraph, labels: np.ndarray) -> np.ndarray:
    """(M,) float64: share of each row's neighbours (of any label) that carry its label; 0 with no neighbours."""
    labels = np.asarray(labels)
    nb = graph.neighbours
    if labels.shape != (nb.shape[0],):
        raise ValueError(f"labels have shape {labels.shape}; the graph has {nb.shape[0]} rows")
    valid = nb >= 0
    same = (labels[np.maximum(nb, 0)] == labels[:, None]) & valid
    return same.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)


# --------------------------------------------------------------------------- searching


def _check_inputs(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    if features.ndim != 2 or features.dtype not in (np.float16, np.float32) or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (M, D) float16 or float32 array, got "
                         f"{features.dtype} {features.shape}")
    labels = np.asarray(labels)
    if labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ({features.shape[0]},) integers, got {labels.dtype} {labels.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return labels.astype(np.int64, copy=False)


def _same_label(search: _Searcher, labels: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(labels), k), dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        out[rows] = search(rows, k)[0]
    return out


class _Searcher:
    """k nearest neighbours of a set of rows among the same rows, exact or approximate (module docstring)."""

    def __init__(self, features: np.ndarray, *, exact_max: int, seed: int):
        self.features, self.exact_max, self.seed = features, exact_max, seed
        self.exact = len(features) <= exact_max
        self.inv_norm = _inverse_norms(features)
        self.unit = self.projection = self.space = None
        if self.exact:
            self.unit = self.units(np.arange(len(features)))
            return
        if features.shape[1] > PCA_DIM:
            self.projection = _Projection.fit(self.units(_sample(len(features), PCA_TRAIN, seed)))
        self.space = np.empty((len(features), self.space_dim), dtype=np.float32)
        for s in range(0, len(features), _BLOCK):
            self.space[s:s + _BLOCK] = self.to_space(self.units(np.arange(s, min(s + _BLOCK, len(features)))))

    @property
    def space_dim(self) -> int:
        return self.projection.dim if self.projection else self.features.shape[1]

    def units(self, rows: np.ndarray) -> np.ndarray:
        """float32 unit vectors of ``features[rows]``, (len(rows), D)."""
        return _to_float32(self.features[rows]) * self.inv_norm[rows, None]

    def to_space(self, units: np.ndarray) -> np.ndarray:
        return self.projection.apply(units) if self.projection else units

    def __call__(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(len(rows), k) global indices of each row's nearest neighbours among ``rows``, and their cosines."""
        want = min(k + 1, len(rows))
        if self.exact:
            units = self.unit if len(rows) == len(self.unit) else self.unit[rows]
            sim, local = faiss.knn(units, units, want, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            dist, local = self._approximate(rows, want)
            sim = 1.0 - dist / 2  # squared L2 between unit vectors = 2 - 2 cos
        sim, local = _drop_self(sim, local, k)
        idx = np.where(local >= 0, rows[np.maximum(local, 0)], -1)
        return idx, np.where(idx >= 0, sim, np.nan).astype(np.float32)

    def _approximate(self, rows: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """Search in the projected space, re-score RERANK x want candidates on float16 unit vectors."""
        space = self.space if len(rows) == len(self.space) else self.space[rows]
        if len(rows) <= self.exact_max:
            base = faiss.IndexFlatL2(space.shape[1])
            base.add(space)
        else:
            base = _ivf(space, want, self.seed)
        refine = faiss.IndexScalarQuantizer(self.features.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        blocks = [rows[s:s + _BLOCK] for s in range(0, len(rows), _BLOCK)]
        for block in blocks:
            refine.add(self.units(block))
        outer = faiss.IndexPreTransform(self.projection.transform(), base) if self.projection else base
        index = faiss.IndexRefine(outer, refine)
        index.k_factor = RERANK
        results = [index.search(self.units(block), want) for block in blocks]
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


@dataclass
class _Projection:
    """PCA of unit vectors: y = (x - mean) @ components, components (D, PCA_DIM)."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, sample: np.ndarray) -> _Projection:
        mean = sample.mean(axis=0)
        centred = sample - mean
        cov = centred.T @ centred
        with threadpool_limits(1, user_api="blas"):  # LAPACK crawls when its threads fight FAISS's OpenMP ones
            _, vecs = np.linalg.eigh(cov)
        return cls(mean, np.ascontiguousarray(vecs[:, ::-1][:, :PCA_DIM]))

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components

    def transform(self) -> faiss.LinearTransform:
        """The same map as a FAISS transform (y = A x + b)."""
        lt = faiss.LinearTransform(len(self.mean), self.dim, True)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.components.T).ravel(), lt.A)
        faiss.copy_array_to_vector((-self.mean @ self.components).astype(np.float32), lt.b)
        lt.is_trained = True
        return lt


def _to_float32(block: np.ndarray) -> np.ndarray:
    """float32 copy of a float16 | float32 block (FAISS's SIMD fp16 decoder is ~3x numpy's cast)."""
    if block.dtype == np.float32:
        return np.array(block, dtype=np.float32)
    decoder = faiss.IndexScalarQuantizer(block.shape[1], faiss.ScalarQuantizer.QT_fp16)
    return decoder.sa_decode(np.ascontiguousarray(block).view(np.uint8))


def _inverse_norms(features: np.ndarray) -> np.ndarray:
    """(M,) float32 1 / ||row|| (1 for an all-zero row)."""
    out = np.empty(len(features), dtype=np.float32)
    for s in range(0, len(features), _BLOCK):
        norm = np.linalg.norm(_to_float32(features[s:s + _BLOCK]), axis=1)
        out[s:s + _BLOCK] = 1.0 / np.where(norm > 0, norm, 1.0)
    return out


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted seeded sample of min(n, size) indices in [0, n)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))


def _drop_self(dist: np.ndarray, local: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own index (wherever ties put it), keep k columns, pad with -1."""
    is_self = local == np.arange(len(local))[:, None]
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]  # non-self entries first, order kept
    dist = np.take_along_axis(dist, keep, axis=1)
    local = np.where(np.take_along_axis(is_self, keep, axis=1), -1, np.take_along_axis(local, keep, axis=1))
    if local.shape[1] < k:
        pad = k - local.shape[1]
        local = np.pad(local, ((0, 0), (0, pad)), constant_values=-1)
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.nan)
    return dist, local


def _ivf(space: np.ndarray, k: int, seed: int) -> faiss.IndexIVFFlat:
    """A filled IndexIVFFlat (L2) over ``space``, nprobe tuned for ``RECALL_TARGET`` at recall@k."""
    n, d = space.shape
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 8))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
    index.cp.seed = seed % (1 << 31)
    index.cp.niter = 10
    index.cp.min_points_per_centroid = 1  # a small training sample is deliberate, not worth a warning
    index.train(space[_sample(n, _TRAIN_PER_LIST * nlist, seed)])
    index.add(space)
    queries = space[_sample(n, _TUNE_QUERIES, seed + 1)]
    truth = faiss.knn(queries, space, k)[1]
    nprobe = min(4, nlist)
    while True:
        index.nprobe = nprobe
        found = index.search(queries, k)[1]
        recall = np.mean([len(np.intersect1d(t, f)) / k for t, f in zip(truth, found)])
        if recall >= RECALL_TARGET or nprobe == nlist:
            break
        nprobe = min(2 * nprobe, nlist)
    log.info("IVF over %d rows: nlist=%d, nprobe=%d, sample recall@%d=%.3f", n, nlist, nprobe, k, recall)
    return index
