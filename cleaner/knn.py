"""FAISS k-nearest-neighbour graph of the training features (cosine), and its agreement score.

Two searches over L2-normalised features, self excluded:

* ``neighbours`` / ``similarity`` (``neighbours``): the k nearest rows of *any* label;
* ``same_label`` (``same_label_knn``): the k_same nearest rows among those with the same
  given label (each class searched on its own rows).

Up to ``exact_max`` rows the graph is exact (``faiss.knn``, inner product of
float32 unit vectors). Above it the search is approximate: features wider than
``PCA_DIM`` are projected by PCA (fitted on a seeded sample) and searched in that
space -- by an IVF index (float16 vectors, nlist ~ 4 sqrt(n), nprobe raised until recall on
sample queries against exhaustive search of the same lists reaches
``RECALL_TARGET``), or exhaustively for a class of at most ``exact_max`` rows --
and the ``RERANK`` x (k + 1) candidates are re-scored by ``IndexRefine`` against
float16 unit vectors, so similarities are cosines of the full features.

Memory: the global search reads its input a block at a time, so it runs on a
``FeatureRows`` (the store's file) as well as on an array; it holds the float16
unit vectors (1x a float16 feature matrix) and the IVF's (M, 256) float16
vectors. ``mcpipe train-head`` runs it on the file *before* loading the features,
so the two never sit in memory together; the per-class searches then need
only one class's vectors beside the loaded features.

``load_or_build`` caches the graph as ``<store stem>.knn-k<k>.npz`` beside the
store; see its docstring for the key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from mcpipe.atomic import replacing
from mcpipe.store.reader import FeatureRows, FeatureStore, read_features

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
_CACHE_VERSION = 2  # 2: IVF vectors in float16, PCA from moments


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


def build_knn(features: np.ndarray | FeatureRows, labels: np.ndarray, *, k: int = 10, k_same: int | None = None,
              exact_max: int = EXACT_MAX, seed: int = 0) -> KnnGraph:
    """The kNN graph of ``features`` (M, D) float16 | float32 with given ``labels`` (M,); see the module docstring."""
    labels = _check_inputs(features, labels, k)
    k_same = k if k_same is None else k_same
    if k_same < 1:
        raise ValueError(f"k_same must be >= 1, got {k_same}")
    start = time.perf_counter()
    nb, sim = neighbours(features, k=k, exact_max=exact_max, seed=seed)
    same = same_label_knn(features, labels, k=k_same, exact_max=exact_max, seed=seed)
    log.info("kNN graph of %d rows (k=%d, %s) in %.1f s", len(labels), k,
             "exact" if len(labels) <= exact_max else "approximate", time.perf_counter() - start)
    return KnnGraph(neighbours=nb, similarity=sim, same_label=same)


def neighbours(features: np.ndarray | FeatureRows, *, k: int = 10, exact_max: int = EXACT_MAX,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``KnnGraph.neighbours`` and ``.similarity``: the k nearest rows of any label.

    ``features`` is read in row slices only, so a ``FeatureRows`` (the store's file) works
    as well as an (M, D) array and is never loaded whole.
    """
    _check_features(features)
    _check_k(k)
    m = features.shape[0]
    want = min(k + 1, m)
    if m <= exact_max:
        unit = np.empty(features.shape, dtype=np.float32)
        for s in range(0, m, _BLOCK):
            unit[s:s + _BLOCK] = _unit(features[s:s + _BLOCK])
        sim, local = faiss.knn(unit, unit, want, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        codes, projection = _encode(features, seed)
        dist, local = _approximate(codes, projection, want, exact_max=exact_max, seed=seed)
        sim = 1.0 - dist / 2  # squared L2 between unit vectors = 2 - 2 cos
    return _finish(sim, local, np.arange(m), k)


def same_label_knn(features: np.ndarray, labels: np.ndarray, *, k: int = 10, exact_max: int = EXACT_MAX,
                   seed: int = 0) -> np.ndarray:
    """``KnnGraph.same_label``: (M, k) int64 nearest rows with the same label, -1 pad.

    Each class is searched on its own rows, gathered from ``features`` (an array, or a
    ``FeatureRows``, which is then loaded whole). Exact when the store has at most
    ``exact_max`` rows; otherwise in the PCA space of the whole store (fitted on the same
    seeded sample as ``neighbours``) with re-scoring on the class's float16 unit vectors.
    """
    labels = _check_inputs(features, labels, k)
    if not isinstance(features, np.ndarray):
        features = read_features(features)
    m, d = features.shape
    exact = m <= exact_max
    projection = None
    if not exact and d > PCA_DIM:
        sample = _sample(m, PCA_TRAIN, seed)
        projection = _Projection.fit(_unit(features[sample[s:s + _BLOCK]]) for s in range(0, len(sample), _BLOCK))
    out = np.empty((m, k), dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        want = min(k + 1, len(rows))
        if exact:
            unit = _unit(features[rows])
            sim, local = faiss.knn(unit, unit, want, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            codes = _fp16_codes(features.shape[1], len(rows))
            _code_view(codes)[:] = codes.sa_encode(_unit(features[rows]))
            sim, local = _approximate(codes, projection, want, exact_max=exact_max, seed=seed)
        out[rows] = _finish(sim, local, rows, k)[0]
    return out


def agreement(graph: KnnGraph, labels: np.ndarray) -> np.ndarray:
    """(M,) float64: share of each row's neighbours (of any label) that carry its label; 0 with no neighbours."""
    labels = np.asarray(labels)
    nb = graph.neighbours
    if labels.shape != (nb.shape[0],):
        raise ValueError(f"labels have shape {labels.shape}; the graph has {nb.shape[0]} rows")
    valid = nb >= 0
    same = (labels[np.maximum(nb, 0)] == labels[:, None]) & valid
    return same.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)


def load_or_build(store: FeatureStore, labels: np.ndarray, *, k: int, cache_dir: Path | None = None,
                  known: tuple[np.ndarray, np.ndarray] | None = None) -> KnnGraph:
    """The graph of ``store``'s features with given ``labels``, from the cache when it is valid.

    The cache, ``<cache_dir or the store's folder>/<store stem>.knn-k<k>.npz``, holds the
    label-independent part (neighbours, similarity), keyed by the store's source and config
    fingerprints, its usable rows, k and the search method; and ``same_label``, keyed by a hash of
    ``labels`` as well. New labels (another noise seed) reuse the neighbours and redo only the
    per-class searches. A missing, stale or unreadable cache is rebuilt, and written atomically; a
    cache that cannot be written is logged, not fatal. A store opened without features is read
    from its file (block by block for the neighbours). ``known``: the (neighbours, similarity)
    that ``load_or_build_neighbours`` returned, used when the cache lacks them (it could not be
    written).
    """
    labels = _check_labels(len(store.rows), labels)
    _check_k(k)
    path, key = _cache_path(store, k, cache_dir), _cache_key(store, k)
    labels_hash = hashlib.sha256(labels.tobytes()).hexdigest()
    cached = _read_cache(path, key, len(labels), k)
    if cached is not None and cached["labels_sha256"] == labels_hash:
        log.info("kNN graph from %s", path)
        return cached["graph"]
    if cached is None and known is not None:
        nb, sim = known
    elif cached is None:
        nb, sim = neighbours(_features_of(store), k=k)
    else:
        log.info("kNN neighbours from %s; same-label neighbours computed for these labels", path)
        nb, sim = cached["graph"].neighbours, cached["graph"].similarity
    graph = KnnGraph(nb, sim, same_label_knn(_features_of(store), labels, k=k))
    _write_cache(path, key, labels_hash, graph)
    return graph


def load_or_build_neighbours(store: FeatureStore, *, k: int,
                             cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``store``'s label-independent (neighbours, similarity), from the cache of ``load_or_build``
    or built and written there (with an empty same-label part).

    Meant for a store opened without features: the search then reads the file block by
    block, and the features can be loaded afterwards, never beside the search's own copy.
    """
    _check_k(k)
    path, key = _cache_path(store, k, cache_dir), _cache_key(store, k)
    cached = _read_cache(path, key, len(store.rows), k)
    if cached is not None:
        return cached["graph"].neighbours, cached["graph"].similarity
    nb, sim = neighbours(_features_of(store), k=k)
    _write_cache(path, key, "", KnnGraph(nb, sim, np.empty((0, k), dtype=np.int64)))
    return nb, sim


def _features_of(store: FeatureStore) -> np.ndarray | FeatureRows:
    return store.features if store.features is not None else FeatureRows(store)


def _cache_path(store: FeatureStore, k: int, cache_dir: Path | None) -> Path:
    return Path(cache_dir if cache_dir is not None else store.path.parent) / f"{store.path.stem}.knn-k{k}.npz"


def _cache_key(store: FeatureStore, k: int) -> str:
    return json.dumps({
        "version": _CACHE_VERSION, "source_fingerprint": store.attrs["source_fingerprint"],
        "config_fingerprint": store.attrs["config_fingerprint"], "num_rows": len(store.rows),
        "rows_sha256": hashlib.sha256(np.asarray(store.rows, dtype=np.int64).tobytes()).hexdigest(), "k": k,
        "method": {"exact_max": EXACT_MAX, "pca_dim": PCA_DIM, "rerank": RERANK, "recall": RECALL_TARGET, "seed": 0},
    }, sort_keys=True)


def _read_cache(path: Path, key: str, m: int, k: int) -> dict | None:
    """The cached graph and its labels hash ("" when it holds no same-label part), or None (logged)."""
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
    same_rows = m if labels_hash else 0
    checks = [(graph.neighbours, m, np.int64), (graph.similarity, m, np.float32), (graph.same_label, same_rows, np.int64)]
    valid = all(a.shape == (rows, k) and a.dtype == t for a, rows, t in checks)
    valid = valid and all(a.min(initial=0) >= -1 and a.max(initial=0) < m for a in (graph.neighbours, graph.same_label))
    if not valid:
        log.warning("kNN cache %s has arrays of the wrong shape, type or range; rebuilding", path)
        return None
    return {"graph": graph, "labels_sha256": labels_hash}


def _write_cache(path: Path, key: str, labels_hash: str, graph: KnnGraph) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), labels_sha256=np.array(labels_hash), neighbours=graph.neighbours,
                     similarity=graph.similarity, same_label=graph.same_label)
    except OSError as exc:
        log.warning("could not write the kNN cache %s: %s", path, exc)


# --------------------------------------------------------------------------- searching


def _check_features(features) -> None:
    if len(features.shape) != 2 or features.dtype not in (np.float16, np.float32) or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (M, D) float16 or float32 array, got "
                         f"{features.dtype} {features.shape}")


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _check_labels(m: int, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (m,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ({m},) integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64, copy=False)


def _check_inputs(features, labels: np.ndarray, k: int) -> np.ndarray:
    _check_features(features)
    _check_k(k)
    return _check_labels(features.shape[0], labels)


def _finish(sim: np.ndarray, local: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search results over ``rows`` -> (global indices, cosines) with self dropped, k columns, -1 / NaN pad."""
    sim, local = _drop_self(sim, local, k)
    idx = np.where(local >= 0, rows[np.maximum(local, 0)], -1)
    return idx, np.where(idx >= 0, sim, np.nan).astype(np.float32)


def _fp16_codes(d: int, n: int) -> faiss.IndexScalarQuantizer:
    """An index of ``n`` float16 vectors, storage sized once (to be filled through ``_code_view``)."""
    codes = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    # sized once and filled in place: add() in blocks would grow the vector by doubling (2x peak memory)
    codes.codes.resize(n * codes.code_size)
    codes.ntotal = n
    return codes


def _code_view(codes: faiss.IndexScalarQuantizer) -> np.ndarray:
    """(ntotal, code_size) uint8 view of the vectors held by ``codes`` (no copy)."""
    n, size = codes.ntotal, codes.code_size
    return faiss.rev_swig_ptr(codes.codes.data(), n * size).reshape(n, size)


def _encode(features, seed: int) -> tuple[faiss.IndexScalarQuantizer, _Projection | None]:
    """One pass over ``features`` in blocks: float16 unit vectors, and the PCA fitted on ``_sample``'s rows."""
    m, d = features.shape
    codes = _fp16_codes(d, m)
    view = _code_view(codes)
    sample = _sample(m, PCA_TRAIN, seed) if d > PCA_DIM else np.empty(0, dtype=np.int64)

    def encode_and_pick():  # the sampled rows of each block, for the PCA
        for s in range(0, m, _BLOCK):
            unit = _unit(features[s:s + _BLOCK])
            view[s:s + len(unit)] = codes.sa_encode(unit)
            yield unit[sample[(sample >= s) & (sample < s + len(unit))] - s]

    if not len(sample):
        for _ in encode_and_pick():
            pass
        return codes, None
    return codes, _Projection.fit(encode_and_pick())


def _approximate(codes: faiss.IndexScalarQuantizer, projection: _Projection | None, want: int, *, exact_max: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each of the n vectors in ``codes`` against all: search the (projected) vectors, re-score
    RERANK x want candidates on the float16 unit vectors. Returns (squared L2 (n, want), local indices)."""
    view = _code_view(codes)
    n = codes.ntotal

    def units(positions: np.ndarray) -> np.ndarray:  # float32 unit vectors of these rows
        return codes.sa_decode(view[positions])

    def to_space(u: np.ndarray) -> np.ndarray:
        return projection.apply(u) if projection else u

    dim = projection.dim if projection else codes.d
    base = faiss.IndexFlatL2(dim) if n <= exact_max else _ivf(dim, n, seed)
    if not base.is_trained:  # on the sample, projected block by block
        sample = _sample(n, _TRAIN_PER_LIST * base.nlist, seed)
        base.train(np.concatenate([to_space(units(sample[s:s + _BLOCK])) for s in range(0, len(sample), _BLOCK)]))
    index = faiss.IndexPreTransform(projection.transform(), base) if projection else base
    for s in range(0, n, _BLOCK):
        index.add(units(np.arange(s, min(s + _BLOCK, n))))
    order = np.arange(n)
    if isinstance(base, faiss.IndexIVF):
        queries = units(_sample(n, _TUNE_QUERIES, seed + 1))
        base.nprobe = _tune_nprobe(index, base, queries, to_space(queries), want)
        order = np.concatenate([ids for ids, _ in _inverted_lists(base)])  # neighbours probe the same lists
    refined = faiss.IndexRefine(index, codes)
    refined.k_factor = RERANK
    dist = np.empty((n, want), dtype=np.float32)
    local = np.empty((n, want), dtype=np.int64)
    for s in range(0, n, _BLOCK):
        positions = order[s:s + _BLOCK]
        dist[positions], local[positions] = refined.search(units(positions), want)
    return dist, local


@dataclass
class _Projection:
    """PCA of unit vectors: y = (x - mean) @ components, components (D, PCA_DIM)."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, blocks: Iterable[np.ndarray]) -> _Projection:
        """Fit on the rows of ``blocks`` ((n_i, D) float32 unit vectors), from their first and second
        moments: no copy of the sample is held."""
        n, total, outer = 0, 0.0, 0.0
        for block in blocks:
            n += len(block)
            total = total + block.sum(axis=0, dtype=np.float64)
            outer = outer + (block.T @ block).astype(np.float64)
        mean = total / max(n, 1)
        cov = outer - n * np.outer(mean, mean)
        with threadpool_limits(1, user_api="blas"):  # LAPACK crawls when its threads fight FAISS's OpenMP ones
            values, vecs = np.linalg.eigh(cov.astype(np.float32))
        kept = values[::-1][:PCA_DIM].sum() / max(values.sum(), 1e-12)
        (log.warning if kept < PCA_WARN else log.info)(
            "PCA to %d dims keeps %.0f%% of the feature variance%s", PCA_DIM, 100 * kept,
            "; approximate neighbours will be poor (features close to isotropic noise?)" if kept < PCA_WARN else "")
        return cls(mean.astype(np.float32), np.ascontiguousarray(vecs[:, ::-1][:, :PCA_DIM]))

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


def _ivf(dim: int, n: int, seed: int) -> faiss.IndexIVFScalarQuantizer:
    """An untrained IVF (L2, vectors stored as float16, half of IVFFlat's memory) for ``n`` rows:
    nlist ~ 4 sqrt(n), 10 seeded k-means iterations."""
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 8))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(dim), dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_L2, False)
    index.cp.seed = seed % (1 << 31)
    index.cp.niter = 10
    index.cp.min_points_per_centroid = 1  # a small training sample is deliberate, not worth a warning
    return index


def _tune_nprobe(index: faiss.Index, ivf: faiss.IndexIVF, queries: np.ndarray, projected: np.ndarray,
                 k: int) -> int:
    """Smallest nprobe (x1.5 steps from 4) whose recall@k on ``queries`` reaches ``RECALL_TARGET``.

    ``index`` is ``ivf``, or ``ivf`` behind the projection (``projected`` = the queries it sees);
    the truth is exhaustive search of its lists.
    """
    truth = faiss.ResultHeap(len(queries), k)
    lists = _inverted_lists(ivf)
    while group := list(itertools.islice(lists, 64)):  # 64 lists decoded at a time
        ids = np.concatenate([i for i, _ in group])
        dist, local = faiss.knn(projected, np.concatenate([v for _, v in group]), min(k, len(ids)))
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


def _inverted_lists(ivf: faiss.IndexIVFScalarQuantizer):
    """Yield (ids, float32 vectors) of each non-empty inverted list (ids a view; vectors decoded from float16)."""
    lists = ivf.invlists
    for i in range(ivf.nlist):
        size = lists.list_size(i)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(i), size)
            codes = faiss.rev_swig_ptr(lists.get_codes(i), size * lists.code_size)
            yield ids, codes.view(np.float16).reshape(size, ivf.d).astype(np.float32)
