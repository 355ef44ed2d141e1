"""Extraction by several processes (``torchrun``): who does which blocks, and joining their shards.

Under ``torchrun --nproc_per_node=G -m mcpipe extract ...`` every rank takes a
contiguous range of the split's blocks and writes it, resumably, into its own
shard store; after a barrier rank 0 copies the shards into ``<split>.h5`` and
removes them. Block boundaries are those of a single-process run.

Ranks use no collective while they extract, so each stops on its own after its
block in flight (torchrun passes SIGTERM to every rank); they agree whether to
stop with :func:`mcpipe.distributed.sum_over_ranks` where they all meet (before
a split, after their shards), so no rank waits for one that has left. Joining
the process group is :mod:`mcpipe.distributed`'s, shared with finetune.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py

from mcpipe.distributed import DistInfo
from mcpipe.store.reader import open_store
from mcpipe.store.writer import StoreWriter

log = logging.getLogger(__name__)


def block_range(num_blocks: int, info: DistInfo) -> tuple[int, int]:
    """The contiguous blocks ``[first, stop)`` of this rank (sizes differ by at most one)."""
    first = num_blocks * info.rank // info.world_size
    stop = num_blocks * (info.rank + 1) // info.world_size
    return first, stop


def shard_path(out: Path, split: str, info: DistInfo) -> Path:
    return out / ".shards" / f"{split}.rank{info.rank}-of-{info.world_size}.h5"


def join_shards(shards: list[tuple[Path, int]], writer: StoreWriter) -> None:
    """Copy complete shard stores into ``writer``; ``shards`` = [(path, first_block)].

    Every shard's block ``i`` is block ``first_block + i`` of the full store.
    Blocks the full store already has are not copied again.
    """
    pending = set(writer.pending_blocks())
    for path, first in shards:
        shard = open_store(path, allow_incomplete=False, load_features=False)
        with h5py.File(path, "r") as f:
            feats, skipped = f["features"], f["skipped"]
            nb = -(-shard.num_rows // writer.block_rows)
            for i in range(nb):
                b = first + i
                if b not in pending:
                    continue
                lo = i * writer.block_rows
                hi = min(lo + writer.block_rows, shard.num_rows)
                writer.write_block(b, feats[lo:hi], skipped[lo:hi])
    writer.commit()
