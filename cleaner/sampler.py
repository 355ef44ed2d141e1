"""K x N class-balanced batches: K class subsets of N images that share a given label.

Classes: an epoch's subset classes are concatenated random permutations of the
classes present, cut into batches of K, so every class gets the same number of
subsets (+-1) and with K > C a batch repeats classes.

Images (``mining="random"``, the paper): each class has an endless *stream* of
passes over its images in random order, cut into chunks of N. A pass leaves out
n mod N images (cyclically, so each image equally often), so a subset never
holds an image twice. Epoch e takes the chunks after those epochs 0..e-1 took,
so every image is drawn about equally often within an epoch and across epochs
(a large class of an imbalanced set is covered over a few epochs before any
image repeats). A class smaller than N (``small_classes``) is drawn with
replacement: each subset holds all its n images N // n times, and N mod n more
from its stream.

``mining="knn"``: the stream draws one anchor per subset; its N - 1 nearest
same-label neighbours (``neighbours``, e.g. ``KnnGraph.same_label``) complete it,
random same-class images filling in where too few are given.
``mining="agreement"``: inside a class, images are drawn with probability
proportional to ``agreement + 0.05`` (no image twice in a subset unless the
class is small).

The order inside every subset is shuffled. ``epoch(e)`` depends only on the
labels, the options, ``seed`` and ``e``: a fresh sampler (a resumed run) draws
the same batches. Everything is vectorised per class, never per image.
"""

from __future__ import annotations

import math
from typing import Iterator, get_args

import numpy as np

from mcpipe.config import Mining
from mcpipe.errors import ConfigError

MINING = get_args(Mining)
AGREEMENT_FLOOR = 0.05  # added to agreement scores: low-agreement images are down-weighted, never excluded
_BLOCK = 4096  # images per random generator in a class stream (small classes pack several passes)
_REDRAWS = 8  # rounds of redrawing subsets that hold an image twice
# generator tags: one independent random stream per purpose
_SEQUENCE, _TAIL, _POOL, _LEFT_OUT, _ORDER, _FILL, _WEIGHTED = range(7)


class SubsetSampler:
    """Batches of (K, N) row indices into ``labels``; see the module docstring.

    Attributes:
        subset_size: N. classes_per_batch: K = batch_size // N.
        small_classes: labels of the classes with fewer than N images (drawn with replacement).
    """

    def __init__(self, labels: np.ndarray, *, subset_size: int, batch_size: int, mining: str = "random",
                 neighbours: np.ndarray | None = None, agreement: np.ndarray | None = None, seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a non-empty 1-d integer array, got {labels.dtype} {labels.shape}")
        if labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got {labels.min()}")
        if subset_size < 1:
            raise ConfigError(f"cleaner.subset_size = {subset_size} is invalid: expected an integer >= 1")
        if batch_size < subset_size:
            raise ConfigError(f"train.batch_size = {batch_size} is invalid: expected at least one subset of "
                              f"cleaner.subset_size = {subset_size} images")
        if mining not in MINING:
            raise ConfigError(f"cleaner.mining = {mining!r} is invalid: expected one of {', '.join(MINING)}")
        self.labels = labels.astype(np.int64)
        self.subset_size = subset_size
        self.classes_per_batch = batch_size // subset_size
        self.mining = mining
        self.seed = seed % (1 << 64)  # SeedSequence needs a non-negative entropy
        self.classes, self.counts = np.unique(self.labels, return_counts=True)
        if subset_size > self.counts.max():
            raise ConfigError(f"cleaner.subset_size = {subset_size} is larger than every class: the largest class "
                              f"has {self.counts.max()} images")
        self.small_classes = [int(c) for c in self.classes[self.counts < subset_size]]
        self._members = np.argsort(self.labels, kind="stable")  # rows grouped by class
        self._starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.neighbours = self._check_neighbours(neighbours) if mining == "knn" else None
        self.agreement = self._check_agreement(agreement) if mining == "agreement" else None

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / (self.classes_per_batch * self.subset_size))

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield ``len(self)`` batches of (K, N) int64 row indices for epoch ``epoch`` (>= 0)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        subsets = self.epoch_subsets(epoch)
        k = self.classes_per_batch
        for b in range(len(self)):
            yield subsets[b * k:(b + 1) * k]

    def epoch_subsets(self, epoch: int) -> np.ndarray:
        """All of epoch ``epoch``'s subsets, (len(self) * K, N) int64, in batch order."""
        seq, counts = self._class_sequence(epoch)
        if self.mining == "agreement":
            subsets = self._weighted(seq, counts, epoch)
        elif self.mining == "knn":
            anchors = self._from_streams(seq, counts, self._stream_offsets(epoch), width=1)[:, 0]
            subsets = self._with_neighbours(anchors, seq, epoch)
        else:
            subsets = self._from_streams(seq, counts, self._stream_offsets(epoch), width=self.subset_size)
        rng = self._rng(_ORDER, epoch)
        order = rng.random(subsets.shape).argsort(axis=1)
        return np.take_along_axis(subsets, order, axis=1)

    # ------------------------------------------------------------------ classes

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _tail(self, epoch: int) -> np.ndarray:
        """Class positions of the epoch's last, partial permutation."""
        num_classes = len(self.classes)
        rest = len(self) * self.classes_per_batch % num_classes
        return self._rng(_TAIL, epoch).permutation(num_classes)[:rest]

    def _class_sequence(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(S,) class position of every subset, and (C,) subsets per class."""
        num_classes = len(self.classes)
        full = len(self) * self.classes_per_batch // num_classes
        perms = self._rng(_SEQUENCE, epoch).permuted(np.tile(np.arange(num_classes), (full, 1)), axis=1)
        tail = self._tail(epoch)
        counts = np.full(num_classes, full, dtype=np.int64)
        counts[tail] += 1
        return np.concatenate([perms.ravel(), tail]), counts

    def _stream_offsets(self, epoch: int) -> np.ndarray:
        """(C,) subsets each class stream gave to epochs 0..epoch-1."""
        num_classes = len(self.classes)
        offsets = np.full(num_classes, epoch * (len(self) * self.classes_per_batch // num_classes), dtype=np.int64)
        for e in range(epoch):
            offsets[self._tail(e)] += 1
        return offsets

    def _place(self, seq: np.ndarray, per_class: list[np.ndarray]) -> np.ndarray:
        """Scatter per-class subset arrays (in class-position order) to their places in ``seq``."""
        out = np.empty((len(seq), per_class[0].shape[1]), dtype=np.int64)
        out[np.argsort(seq, kind="stable")] = np.concatenate(per_class)
        return out

    # ------------------------------------------------------------------ random (streams)

    def _from_streams(self, seq: np.ndarray, counts: np.ndarray, offsets: np.ndarray, *, width: int) -> np.ndarray:
        """(S, width) subsets: the next ``counts[c]`` chunks of each class stream, placed in ``seq`` order."""
        per_class = []
        for c, (n, start) in enumerate(zip(self.counts.tolist(), self._starts[:-1].tolist())):
            size, offset = int(counts[c]), int(offsets[c])
            if n >= width:
                local = self._stream(c, n, offset * width, size * width, width).reshape(size, width)
            else:  # a small class: all its images, N // n times each, + N mod n from its stream
                copies, rest = divmod(width, n)
                local = np.tile(np.arange(n), (size, copies))
                if rest:
                    extra = self._stream(c, n, offset * rest, size * rest, rest).reshape(size, rest)
                    local = np.hstack([local, extra])
            per_class.append(self._members[start + local])
        return self._place(seq, per_class)

    def _stream(self, c: int, n: int, start: int, length: int, width: int) -> np.ndarray:
        """Elements [start, start + length) of class position c's stream of local indices in [0, n).

        The stream is passes over the n images in random order. A pass leaves out r = n mod width
        images so that chunks of ``width`` never straddle two passes; pass p leaves out
        ``order[p r : p r + r]`` (cyclically, ``order`` a fixed random permutation), so every image is
        left out equally often. Passes are generated in blocks of ~_BLOCK images, one seeded
        generator per (class, block), so any window is computed without the ones before it.
        """
        if length == 0:
            return np.empty(0, dtype=np.int64)
        rest = n % width
        per_pass = n - rest
        passes_per_block = max(1, _BLOCK // n)
        block_len = passes_per_block * per_pass
        first, last = start // block_len, (start + length - 1) // block_len
        order = self._rng(_LEFT_OUT, c).permutation(n) if rest else None
        blocks = []
        for b in range(first, last + 1):
            rng = self._rng(_POOL, c, b)
            if not rest:
                blocks.append(rng.permuted(np.tile(np.arange(n), (passes_per_block, 1)), axis=1))
                continue
            keys = rng.random((passes_per_block, n))
            passes = b * passes_per_block + np.arange(passes_per_block)
            np.put_along_axis(keys, order[(passes[:, None] * rest + np.arange(rest)) % n], 2.0, axis=1)
            blocks.append(np.argsort(keys, axis=1)[:, :per_pass])  # left-out images sort last
        stream = np.concatenate(blocks, axis=None)
        begin = start - first * block_len
        return stream[begin:begin + length]

    # ------------------------------------------------------------------ knn

    def _check_neighbours(self, neighbours: np.ndarray | None) -> np.ndarray:
        m = len(self.labels)
        if neighbours is None:
            raise ValueError("mining='knn' needs neighbours: (M, k) int64 same-label neighbour indices")
        nb = np.asarray(neighbours)
        if nb.ndim != 2 or nb.shape[0] != m or not np.issubdtype(nb.dtype, np.integer):
            raise ValueError(f"neighbours must be an ({m}, k) integer array, got {nb.dtype} {nb.shape}")
        if nb.size and (nb.min() < -1 or nb.max() >= m):
            raise ValueError(f"neighbours hold indices in [{nb.min()}, {nb.max()}]; expected -1 (none) or [0, {m})")
        return nb.astype(np.int64, copy=False)

    def _with_neighbours(self, anchors: np.ndarray, seq: np.ndarray, epoch: int) -> np.ndarray:
        """(S, N): anchor, its nearest same-label neighbours, random same-class images where too few."""
        n_sub = self.subset_size
        out = np.full((len(anchors), n_sub), -1, dtype=np.int64)
        out[:, 0] = anchors
        if n_sub == 1:
            return out
        nb = self.neighbours[anchors]
        valid = (nb >= 0) & (nb != anchors[:, None])
        valid &= self.labels[np.maximum(nb, 0)] == self.labels[anchors][:, None]
        pos = np.cumsum(valid, axis=1) - 1
        rows, cols = np.nonzero(valid & (pos < n_sub - 1))
        out[rows, 1 + pos[rows, cols]] = nb[rows, cols]
        fill = out < 0
        need = fill.copy()
        rng = self._rng(_FILL, epoch)
        for _ in range(_REDRAWS):
            r, j = np.nonzero(need)
            cls = seq[r]
            out[r, j] = self._members[self._starts[cls] + (rng.random(len(r)) * self.counts[cls]).astype(np.int64)]
            redo = _has_repeat(out) & (self.counts[seq] >= n_sub) & fill.any(axis=1)
            if not redo.any():
                break
            need = fill & redo[:, None]
        return out

    # ------------------------------------------------------------------ agreement

    def _check_agreement(self, agreement: np.ndarray | None) -> np.ndarray:
        m = len(self.labels)
        if agreement is None:
            raise ValueError("mining='agreement' needs agreement: (M,) scores in [0, 1], e.g. knn.agreement(graph)")
        a = np.asarray(agreement, dtype=np.float64)
        if a.shape != (m,) or not np.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"agreement must be ({m},) finite scores >= 0, got shape {a.shape}")
        return a

    def _weighted(self, seq: np.ndarray, counts: np.ndarray, epoch: int) -> np.ndarray:
        rng = self._rng(_WEIGHTED, epoch)
        n_sub = self.subset_size
        per_class = []
        for c, (n, start) in enumerate(zip(self.counts, self._starts[:-1])):
            members = self._members[start:start + n]
            w = self.agreement[members] + AGREEMENT_FLOOR
            cdf = np.cumsum(w / w.sum())
            cdf[-1] = np.inf
            local = np.searchsorted(cdf, rng.random((counts[c], n_sub)), side="right")
            if n >= n_sub:
                local = _distinct_rows(local, cdf, np.log(w), rng)
            per_class.append(members[local])
        return self._place(seq, per_class)


def _has_repeat(rows: np.ndarray) -> np.ndarray:
    """(S,) bool: row holds some value twice."""
    s = np.sort(rows, axis=1)
    return (s[:, 1:] == s[:, :-1]).any(axis=1)


def _distinct_rows(local: np.ndarray, cdf: np.ndarray, log_w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Redraw rows of weighted draws that repeat an index; the last few by Gumbel top-N (exact, no repeats)."""
    for _ in range(_REDRAWS):
        redo = np.flatnonzero(_has_repeat(local))
        if not redo.size:
            return local
        local[redo] = np.searchsorted(cdf, rng.random((len(redo), local.shape[1])), side="right")
    redo = np.flatnonzero(_has_repeat(local))
    if redo.size:
        keys = log_w + rng.gumbel(size=(len(redo), len(log_w)))
        local[redo] = np.argpartition(-keys, local.shape[1] - 1, axis=1)[:, :local.shape[1]]
    return local


class OnRows:
    """A :class:`SubsetSampler` built on ``rows`` of a larger array, yielding indices into that array.

    The training rows of a head run are the store's rows minus the validation
    hold-out; the features stay one array on the device and batches index it.
    """

    def __init__(self, sampler: SubsetSampler, rows: np.ndarray) -> None:
        if len(rows) != len(sampler.labels):
            raise ValueError(f"{len(rows)} rows for a sampler over {len(sampler.labels)} labels")
        self.sampler = sampler
        self.rows = np.asarray(rows, dtype=np.int64)
        self.subset_size = sampler.subset_size
        self.small_classes = sampler.small_classes

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        for batch in self.sampler.epoch(epoch):
            yield self.rows[batch]
