"""FAISS k-nearest-neighbour graph of the training features (cosine), and its agreement score.

Two searches over L2-normalised features, self excluded:

* ``neighbours`` / ``similarity``: the k nearest rows of *any* label;
* ``same_label``: the k_same nearest rows among those with the same given label
  (each class searched on its own rows).

Up to ``exact_max`` rows the graph is exact (``faiss.knn``, inner product of
float32 unit vectors; 2x a float16 matrix of memory). Above it the search is
approximate: features wider than ``PCA_DIM`` are projected by PCA (fitted on a
seeded sample) and searched in that space -- by an ``IndexIVFFlat`` (nlist ~
4 sqrt(n), nprobe raised until recall on sample queries against exhaustive
search of the same lists reaches ``RECALL_TARGET``), or exhaustively for a
class of at most ``exact_max`` rows -- and the ``RERANK`` x (k + 1) candidates
are re-scored by ``IndexRefine`` against float16 unit vectors, so similarities
are cosines of the full features. Features are converted block by block: the
approximate path holds the float16 unit vectors (1x the float16 matrix) and the
IVF's (n, 256) float32 vectors, never a float32 copy of the features.

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
PCA_WARN = 0.6  # share of variance kept below which the approximate graph is logged as unreliable
RERANK = 5  # candidates per wanted neighbour re-scored with exact cosine
RECALL_TARGET = 0.98  # recall@k of the IVF against exhaustive search in the same space
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


def load_or_build(store: FeatureStore, labels: np.ndarray, *, k: int, cache_dir: Path | None = None) -> KnnGraph:
    """The graph of ``store``'s features with given ``labels``, from the cache when it is valid.

    The cache, ``<cache_dir or the store's folder>/<store stem>.knn-k<k>.npz``, holds the
    label-independent part (neighbours, similarity), keyed by the store's source and config
    fingerprints, its usable rows, k and the search method; and ``same_label``, keyed by a hash of
    ``labels`` as well. New labels (another noise seed) reuse the neighbours and redo only the
    per-class searches. A missing, stale or unreadable cache is rebuilt, and written atomically; a
    cache that cannot be written is logged, not fatal.
    """
    if store.features is None:
        raise DataError(f"store {store.path} was opened without features; the kNN graph needs them")
    labels = _check_inputs(store.features, labels, k)
    path = Path(cache_dir if cache_dir is not None else store.path.parent) / f"{store.path.stem}.knn-k{k}.npz"
    key = _cache_key(store, k)
    labels_hash = hashlib.sha256(labels.tobytes()).hexdigest()
    cached = _read_cache(path, key, len(labels), k)
    if cached is not None and cached["labels_sha256"] == labels_hash:
        log.info("kNN graph from %s", path)
        return cached["graph"]
    if cached is None:
        graph = build_knn(store.features, labels, k=k)
    else:
        log.info("kNN neighbours from %s; same-label neighbours recomputed for new labels", path)
        graph = cached["graph"]
        graph.same_label = same_label_knn(store.features, labels, k=k)
    _write_cache(path, key, labels_hash, graph)
    return graph


def _cache_key(store: FeatureStore, k: int) -> str:
    return json.dumps({
        "version": _CACHE_VERSION, "source_fingerprint": store.attrs["source_fingerprint"],
        "config_fingerprint": store.attrs["config_fingerprint"], "num_rows": len(store.rows),
        "rows_sha256": hashlib.sha256(np.asarray(store.rows, dtype=np.int64).tobytes()).hexdigest(), "k": k,
        "method": {"exact_max": EXACT_MAX, "pca_dim": PCA_DIM, "rerank": RERANK, "recall": RECALL_TARGET, "seed": 0},
    }, sort_keys=True)


def _read_cache(path: Path, key: str, m: int, k: int) -> dict | None:
    """The cached graph and its labels hash, or None (logged) when absent, stale or invalid."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                log.info("kNN cache %s is stale (store, k or method changed); rebuilding", path)
                return None
            graph = KnnGraph(data["neighbours"], data["similarity"], data["same_label"])
            labels_hash = str(data["labels_sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("kNN cache %s is unreadable (%s); rebuilding", path, exc)
        return None
    checks = [(graph.neighbours, np.int64), (graph.similarity, np.float32), (graph.same_label, np.int64)]
    valid = all(a.shape == (m, k) and a.dtype == t for a, t in checks)
    valid = valid and all(a.min(initial=0) >= -1 and a.max(initial=0) < m for a in (graph.neighbours, graph.same_label))
    if not valid:
        log.warning("kNN cache %s has arrays of the wrong shape, type or range; rebuilding", path)
        return None
    return {"graph": graph, "labels_sha256": labels_hash}


def _write_cache(path: Path, key: str, labels_hash: str, graph: KnnGraph) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), labels_sha256=np.array(labels_hash), neighbours=graph.neighbours,
                     similarity=graph.similarity, same_label=graph.same_label)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the kNN cache %s: %s", path, exc)
        if tmp.is_file():
            tmp.unlink()


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
        self.exact_max, self.seed = exact_max, seed
        self.exact = len(features) <= exact_max
        if self.exact:
            self.unit = np.empty(features.shape, dtype=np.float32)
            for s in range(0, len(features), _BLOCK):
                self.unit[s:s + _BLOCK] = _unit(features[s:s + _BLOCK])
            return
        self.projection = None
        if features.shape[1] > PCA_DIM:
            self.projection = _Projection.fit(_unit(features[_sample(len(features), PCA_TRAIN, seed)]))
        # float16 unit vectors: decoded as queries, and what candidates are re-scored against
        self.codes = faiss.IndexScalarQuantizer(features.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        # sized once and filled in place: add() in blocks would grow the vector by doubling (2x peak memory)
        self.codes.codes.resize(len(features) * self.codes.code_size)
        view = self._code_view(len(features))
        for s in range(0, len(features), _BLOCK):
            view[s:s + _BLOCK] = self.codes.sa_encode(_unit(features[s:s + _BLOCK]))
        self.codes.ntotal = len(features)

    def _to_space(self, units: np.ndarray) -> np.ndarray:
        return self.projection.apply(units) if self.projection else units

    def _code_view(self, n: int) -> np.ndarray:
        """(n, code_size) uint8 view of the float16 unit vectors held by ``self.codes`` (no copy)."""
        size = self.codes.code_size
        return faiss.rev_swig_ptr(self.codes.codes.data(), n * size).reshape(n, size)

    def __call__(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(len(rows), k) global indices of each row's nearest neighbours among ``rows``, and their cosines."""
        want = min(k + 1, len(rows))
        if self.exact:
            unit = self.unit if len(rows) == len(self.unit) else self.unit[rows]
            sim, local = faiss.knn(unit, unit, want, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            dist, local = self._approximate(rows, want)
            sim = 1.0 - dist / 2  # squared L2 between unit vectors = 2 - 2 cos
        sim, local = _drop_self(sim, local, k)
        idx = np.where(local >= 0, rows[np.maximum(local, 0)], -1)
        return idx, np.where(idx >= 0, sim, np.nan).astype(np.float32)

    def _approximate(self, rows: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the (projected) rows, re-score RERANK x want candidates on the float16 unit vectors."""
        codes = self._code_view(self.codes.ntotal)

        def units(positions: np.ndarray) -> np.ndarray:  # float32 unit vectors of rows[positions]
            return self.codes.sa_decode(codes[rows[positions]])

        n = len(rows)
        dim = self.projection.dim if self.projection else self.codes.d
        base = faiss.IndexFlatL2(dim) if n <= self.exact_max else _ivf(dim, n, self.seed)
        if not base.is_trained:  # on the sample, projected block by block
            sample = _sample(n, _TRAIN_PER_LIST * base.nlist, self.seed)
            base.train(np.concatenate([self._to_space(units(sample[s:s + _BLOCK]))
                                       for s in range(0, len(sample), _BLOCK)]))
        index = faiss.IndexPreTransform(self.projection.transform(), base) if self.projection else base
        for s in range(0, n, _BLOCK):
            index.add(units(np.arange(s, min(s + _BLOCK, n))))
        order = np.arange(n)
        if isinstance(base, faiss.IndexIVFFlat):
            queries = units(_sample(n, _TUNE_QUERIES, self.seed + 1))
            base.nprobe = _tune_nprobe(index, base, queries, self._to_space(queries), want)
            order = np.concatenate([ids for ids, _ in _inverted_lists(base)])  # neighbours probe the same lists
        if n == self.codes.ntotal:
            refine = self.codes
        else:
            refine = faiss.IndexScalarQuantizer(self.codes.d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
            refine.add_sa_codes(codes[rows])
        index = faiss.IndexRefine(index, refine)
        index.k_factor = RERANK
        dist = np.empty((n, want), dtype=np.float32)
        local = np.empty((n, want), dtype=np.int64)
        for s in range(0, n, _BLOCK):
            positions = order[s:s + _BLOCK]
            dist[positions], local[positions] = index.search(units(positions), want)
        return dist, local


@dataclass
class _Projection:
    """PCA of unit vectors: y = (x - mean) @ components, components (D, PCA_DIM)."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, sample: np.ndarray) -> _Projection:
        """Fit on ``sample`` (n, D) float32 unit vectors, which it centres in place."""
        mean = sample.mean(axis=0)
        sample -= mean
        cov = sample.T @ sample
        with threadpool_limits(1, user_api="blas"):  # LAPACK crawls when its threads fight FAISS's OpenMP ones
            values, vecs = np.linalg.eigh(cov)
        kept = values[::-1][:PCA_DIM].sum() / max(values.sum(), 1e-12)
        (log.warning if kept < PCA_WARN else log.info)(
            "PCA to %d dims keeps %.0f%% of the feature variance%s", PCA_DIM, 100 * kept,
            "; approximate neighbours will be poor (features close to isotropic noise?)" if kept < PCA_WARN else "")
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


def _unit(block: np.ndarray) -> np.ndarray:
    """float32 L2-normalised rows of a float16 | float32 block (an all-zero row stays zero).

    float16 is decoded by FAISS's SIMD fp16 codec, about 3x faster than numpy's cast.
    """
    if block.dtype == np.float16:
        decoder = faiss.IndexScalarQuantizer(block.shape[1], faiss.ScalarQuantizer.QT_fp16)
        x = decoder.sa_decode(np.ascontiguousarray(block).view(np.uint8))
    else:
        x = np.array(block, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.where(norm > 0, norm, 1.0)
    return x


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


def _ivf(dim: int, n: int, seed: int) -> faiss.IndexIVFFlat:
    """An untrained IndexIVFFlat (L2) for ``n`` rows: nlist ~ 4 sqrt(n), 10 seeded k-means iterations."""
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 8))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
    index.cp.seed = seed % (1 << 31)
    index.cp.niter = 10
    index.cp.min_points_per_centroid = 1  # a small training sample is deliberate, not worth a warning
    return index


def _tune_nprobe(index: faiss.Index, ivf: faiss.IndexIVFFlat, queries: np.ndarray, projected: np.ndarray,
                 k: int) -> int:
    """Smallest nprobe (x1.5 steps from 4) whose recall@k on ``queries`` reaches ``RECALL_TARGET``.

    ``index`` is ``ivf``, or ``ivf`` behind the projection (``projected`` = the queries it sees);
    the truth is exhaustive search of its lists.
    """
    truth = faiss.ResultHeap(len(queries), k)
    lists = list(_inverted_lists(ivf))
    for s in range(0, len(lists), 64):
        ids = np.concatenate([i for i, _ in lists[s:s + 64]])
        dist, local = faiss.knn(projected, np.concatenate([v for _, v in lists[s:s + 64]]), min(k, len(ids)))
        truth.add_result(dist, np.where(local >= 0, ids[np.maximum(local, 0)], -1))
    truth.finalize()
    nprobe = min(4, ivf.nlist)
    while True:
        ivf.nprobe = nprobe
        found = index.search(queries, k)[1]
        recall = np.mean([len(np.intersect1d(t, f)) / k for t, f in zip(truth.I, found)])
        if recall >= RECALL_TARGET or nprobe == ivf.nlist:
            break
        nprobe = min(int(math.ceil(1.5 * nprobe)), ivf.nlist)
    log.info("IVF over %d rows: nlist=%d, nprobe=%d, sample recall@%d=%.3f", ivf.ntotal, ivf.nlist, nprobe, k, recall)
    return nprobe


def _inverted_lists(ivf: faiss.IndexIVFFlat):
    """Yield (ids, vectors) of each non-empty inverted list: views, no copies (IVFFlat codes are raw float32)."""
    lists = ivf.invlists
    for i in range(ivf.nlist):
        size = lists.list_size(i)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(i), size)
            codes = faiss.rev_swig_ptr(lists.get_codes(i), size * lists.code_size)
            yield ids, codes.view(np.float32).reshape(size, ivf.d)
