"""Images for end-to-end training: seeded augmentation, K x N subsets, shards for several processes,
and the validation hold-out of the training split.

Every training item is addressed by ``(epoch, position, row)``: ``position`` is
its place in the epoch's global sequence of batches, so the random crop and
flip it gets depend on ``(seed, epoch, position)`` only -- not on the number of
DataLoader workers or processes, and not on where a run was interrupted.

An image that cannot be read is replaced by the next readable image of the
same given label (its row is what the batch reports), so a K x N batch keeps
its shape and its labels; how many were replaced is logged by the caller.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mcpipe.cleaner.sampler import SubsetSampler
from mcpipe.errors import DataError
from mcpipe.extract.images import ImageSkip
from mcpipe.extract.sources.base import SplitIndex

_SUBSTITUTES = 16  # same-label images tried in place of an unreadable one


class TrainImages(Dataset):
    """``ds[(epoch, position, row)]`` -> (image (3, S, S) float32, row asked for, row actually read)."""

    def __init__(self, index: SplitIndex, labels: np.ndarray, transform: Callable, *, seed: int, min_size: int):
        self.index, self.transform, self.seed, self.min_size = index, transform, seed, min_size
        self.labels = np.asarray(labels)
        order = np.argsort(self.labels, kind="stable")
        self.members = {int(c): order[self.labels[order] == c] for c in np.unique(self.labels)}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, position, row = key
        state = np.random.SeedSequence([self.seed, epoch, position]).generate_state(2, dtype=np.uint64)
        torch.manual_seed(int(state[0] >> np.uint64(1)))  # transforms draw from the global torch RNG
        members = self.members[int(self.labels[row])]
        start = int(np.searchsorted(members, row)) if len(members) else 0
        first_error = None
        for step in range(min(_SUBSTITUTES, len(members))):
            candidate = int(members[(start + step) % len(members)]) if step else row
            try:
                return self.transform(self.index.load(candidate, min_size=self.min_size)), row, candidate
            except ImageSkip as skip:
                first_error = first_error or skip
        raise DataError(f"{self.index.ids[row]} and {_SUBSTITUTES - 1} other images labelled "
                        f"{self.index.classes[self.labels[row]]!r} cannot be read ({first_error.reason}: "
                        f"{first_error.detail}); check the data")


class SubsetBatches(Sampler[list[tuple[int, int, int]]]):
    """Epoch ``epoch`` of a ``SubsetSampler``: flat K·N keys per batch (each subset's N rows together).

    With ``world`` processes, rank ``r`` takes batches r, r + world, ...: ranks draw disjoint
    subsets, every rank the same number of batches (``steps``; a last partial round is left out).
    ``start``: this rank's first ``start`` batches are skipped (a run resumed inside the epoch); their
    keys are never made, so no image of theirs is read.
    """

    def __init__(self, sampler: SubsetSampler, epoch: int, *, rank: int = 0, world: int = 1, start: int = 0):
        self.sampler, self.epoch, self.rank, self.world = sampler, epoch, rank, world
        self.start = _check_start(start, self.steps)

    @property
    def steps(self) -> int:
        """Batches of the whole epoch on this rank."""
        return len(self.sampler) // self.world

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        stop = self.steps * self.world
        for b, rows in enumerate(self.sampler.epoch(self.epoch)):
            if b >= stop:
                return
            if b % self.world == self.rank and b // self.world >= self.start:
                flat = rows.reshape(-1)
                base = b * flat.size
                yield [(self.epoch, base + j, int(r)) for j, r in enumerate(flat)]


class ShuffledBatches(Sampler[list[tuple[int, int, int]]]):
    """Plain batches of ``batch_size`` rows: a seeded permutation per epoch, the last partial batch left out,
    shared between ranks and resumed at ``start`` like ``SubsetBatches``."""

    def __init__(self, num_rows: int, batch_size: int, epoch: int, *, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0):
        self.num_rows, self.batch_size, self.epoch, self.seed = num_rows, batch_size, epoch, seed
        self.rank, self.world = rank, world
        self.start = _check_start(start, self.steps)

    @property
    def steps(self) -> int:
        """Batches of the whole epoch on this rank."""
        return (self.num_rows // self.batch_size) // self.world

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.num_rows)
        for i in range(self.start, self.steps):
            b = i * self.world + self.rank
            rows = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(self.epoch, b * self.batch_size + j, int(r)) for j, r in enumerate(rows)]


def _check_start(start: int, steps: int) -> int:
    """``start`` batches done of ``steps``: a checkpoint of this epoch cannot say more than the epoch has."""
    if not 0 <= start <= steps:
        raise DataError(f"the checkpoint's position, batch {start}, is outside the epoch's {steps} batches; "
                        "--overwrite to start again")
    return start


def collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (images (M, 3, S, S), rows asked for (M,), rows read (M,))."""
    images, rows, read = zip(*items)
    return torch.stack(images), torch.tensor(rows, dtype=torch.int64), torch.tensor(read, dtype=torch.int64)
