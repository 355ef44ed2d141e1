"""What every data source produces: an index of one split.

A source reads its data set's real layout and returns, per split, a
:class:`SplitIndex`: ids, given (noisy) labels, known clean labels and class
names, plus how to get an image. File-based sources point at files under
``root``; array-based ones (IDX, CIFAR pickles) carry the pixels in memory;
shard sources (WebDataset tars) say where each image's bytes lie (``members``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from mcpipe.errors import DataError
from mcpipe.extract.images import from_array, open_image, open_image_bytes
from mcpipe.extract.sources.members import Members

UNKNOWN = -1  # clean_labels value for "true label not known"


@dataclass(frozen=True, eq=False)
class SplitIndex:
    """One split of a data set, before any image is read.

    Attributes:
        source: data source name, e.g. ``"food101n"``.
        split: split name, e.g. ``"train"``, ``"test"``, ``"verified_train"``.
        root: folder the file ids are relative to.
        ids: (N,) unique strings: image path relative to ``root`` or the data set's key.
        labels: (N,) int64 labels as given (noisy), in ``[0, len(classes))``.
        clean_labels: (N,) int64 true labels where known, ``UNKNOWN`` (-1) elsewhere.
        classes: class names; label ``k`` is ``classes[k]``.
        pixels: (N, H, W) or (N, H, W, 3) uint8 images for array sources, else None.
        verified: (N,) int8 human verification where a data set has it
            (1 label correct, 0 label wrong, -1 not verified), else None.
        members: for shard sources, where row i's encoded image lies inside a
            shard (see ``members.py``), else None.
    """

    source: str
    split: str
    root: Path
    ids: list[str]
    labels: np.ndarray
    clean_labels: np.ndarray
    classes: list[str]
    pixels: np.ndarray | None = None
    verified: np.ndarray | None = None
    members: Members | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        assert self.labels.shape == (n,) and self.clean_labels.shape == (n,), "labels must be (N,)"
        assert self.pixels is None or len(self.pixels) == n
        assert self.verified is None or self.verified.shape == (n,)
        assert self.members is None or len(self.members) == n

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int, *, min_size: int | None = None) -> Image.Image:
        """Image ``i`` as RGB; raises ``ImageSkip`` for a missing or unreadable file."""
        if self.pixels is not None:
            return from_array(self.pixels[i])
        if self.members is not None:
            return open_image_bytes(self.members.read(i), min_size=min_size)
        return open_image(self.root / self.ids[i], min_size=min_size)

    def fingerprint(self) -> str:
        """sha256 of what defines this split's rows: source, split, ids, labels, clean labels."""
        h = hashlib.sha256()
        h.update(f"{self.source}\0{self.split}\0{len(self.ids)}\0".encode())
        h.update("\0".join(self.ids).encode("utf-8"))
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.clean_labels, dtype="<i8").tobytes())
        h.update("\0".join(self.classes).encode("utf-8"))
        return h.hexdigest()

    def take(self, rows: np.ndarray) -> "SplitIndex":
        """The sub-index of ``rows`` (in the order given)."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(
            self,
            ids=[self.ids[i] for i in rows],
            labels=self.labels[rows],
            clean_labels=self.clean_labels[rows],
            pixels=None if self.pixels is None else self.pixels[rows],
            verified=None if self.verified is None else self.verified[rows],
            members=None if self.members is None else self.members.take(rows),
        )


def limit_index(index: SplitIndex, limit: int, *, subset: str = "random", seed: int = 0) -> SplitIndex:
    """At most ``limit`` rows of ``index`` (0 = all): the first ones, or a seeded
    random subset kept in the original order."""
    if limit <= 0 or limit >= len(index):
        return index
    if subset == "first":
        rows = np.arange(limit)
    else:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(index), size=limit, replace=False))
    return index.take(rows)


def check_index(index: SplitIndex) -> SplitIndex:
    """Refuse an empty split, duplicate ids or labels outside the class list."""
    where = f"{index.source} split {index.split!r} under {index.root}"
    if len(index) == 0:
        raise DataError(f"{where} has no images")
    k = len(index.classes)
    bad = (index.labels < 0) | (index.labels >= k)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: label {int(index.labels[i])} of {index.ids[i]!r} is outside the {k} classes")
    badc = (index.clean_labels < UNKNOWN) | (index.clean_labels >= k)
    if badc.any():
        i = int(np.flatnonzero(badc)[0])
        raise DataError(f"{where}: clean label {int(index.clean_labels[i])} of {index.ids[i]!r} is outside the {k} classes")
    if len(set(index.ids)) != len(index.ids):
        seen: set[str] = set()
        dup = next(x for x in index.ids if x in seen or seen.add(x))
        raise DataError(f"{where}: id {dup!r} appears more than once")
    return index
