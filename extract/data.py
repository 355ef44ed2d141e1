"""Torch datasets and samplers over a SplitIndex for extraction.

Images are read and preprocessed in DataLoader workers; a bad image becomes a
zero tensor with its skip code, so every batch keeps the shape of its block
and the main loop decides (skip and record, or ``--strict``: stop).
"""

from __future__ import annotations

import signal
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from mcpipe.extract.images import ImageSkip
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.stopping import SIGNALS
from mcpipe.store.schema import SKIP_REASONS


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: SIGTERM and SIGUSR1 are the main process's to act on. Slurm signals the
    whole process group; a worker that died of it would end the run before its block in flight is written (the
    main process ends its workers when it stops)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class IndexImages(Dataset):
    """``ds[i]`` -> (i, image tensor (3, S, S) float32, skip code uint8, detail str)."""

    def __init__(self, index: SplitIndex, transform: Callable, *, image_size: int, min_size: int):
        self.index = index
        self.transform = transform
        self.image_size = image_size
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int, str]:
        try:
            image = self.index.load(i, min_size=self.min_size)
            return i, self.transform(image), 0, ""
        except ImageSkip as skip:
            zeros = torch.zeros(3, self.image_size, self.image_size)
            return i, zeros, SKIP_REASONS.index(skip.reason), skip.detail


class BlockSampler(Sampler[list[int]]):
    """Yields the row numbers of each block to extract, in order: one block = one batch.

    ``blocks`` are block numbers of ``block_rows`` rows of a ``num_rows``-row store.
    """

    def __init__(self, blocks: Sequence[int], *, block_rows: int, num_rows: int):
        self.blocks = list(blocks)
        self.block_rows = block_rows
        self.num_rows = num_rows

    def rows(self, b: int) -> list[int]:
        start = b * self.block_rows
        stop = min(start + self.block_rows, self.num_rows)
        return list(range(start, stop))

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.blocks:
            yield self.rows(b)

    def __len__(self) -> int:
        return len(self.blocks)
