"""The extraction hot loop: DataLoader -> backbone -> store, with writing overlapped.

The main thread only feeds the device. Each batch's features go, as a device
tensor (copied to pinned memory without blocking on CUDA), to a writer thread
that waits for them, zeroes skipped rows and writes the block. Loading runs
ahead in DataLoader workers, so decode, compute and write overlap.

A stop request (SIGTERM, SIGUSR1: ``mcpipe.stopping``) is looked at after each
batch: the loop ends there, the blocks already handed to the writer thread are
written, and the caller's ``StoreWriter.close`` commits them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mcpipe.errors import DataError
from mcpipe.stopping import StopRequest
from mcpipe.store.schema import SKIP_REASONS
from mcpipe.store.writer import StoreWriter

log = logging.getLogger(__name__)

_MAX_SKIP_WARNINGS = 20  # one line per bad image up to here; a web crawl can have thousands


@dataclass
class BlockStats:
    images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    stopped: bool = False  # ended early on a stop request, blocks left to do


class _WriterThread:
    """Writes (block, features, skip codes) items in the background; re-raises its errors."""

    def __init__(self, writer: StoreWriter, *, depth: int = 4):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.abandoned = False  # set by close() when it is interrupted: write no further block
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mcpipe-store-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None or self.abandoned:
                    return
                if self.error is not None:
                    continue  # drain after a failure
                block, feats, event, codes = item
                try:
                    if event is not None:
                        event.synchronize()
                    arr = feats.numpy()
                    if codes.any():
                        arr[codes > 0] = 0
                    self.writer.write_block(block, arr, codes)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self.error = exc
        finally:
            self.finished.set()

    def put(self, item: tuple) -> None:
        self.check()
        self.queue.put(item)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write the queued blocks and end the thread. Interrupted (a second signal, Ctrl-C), it writes no further
        block but waits for the one being written: the store is never closed under a write. (It waits on an
        Event: in Python 3.11 a ``Thread.join`` interrupted by KeyboardInterrupt marks the thread as ended while it
        still runs, and a second join returns at once.)"""
        try:
            self.queue.put(None)
            self.finished.wait()
        except BaseException:
            self.abandoned = True
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(None)  # wakes the thread if it waits for an item
            self.finished.wait()
            self.thread.join()  # it is returning (finished is set in its last lines): a moment at most
            raise
        self.thread.join()  # it has ended: at once
        self.check()


def extract_blocks(
    model: nn.Module,
    loader: DataLoader,
    blocks: list[int],
    writer: StoreWriter,
    *,
    device: torch.device,
    ids: list[str],
    strict: bool,
    on_batch: Callable[[int], None] | None = None,
    stop: StopRequest | None = None,
) -> BlockStats:
    """Run ``model`` over the ``loader`` (one batch per entry of ``blocks``) into ``writer``.

    Returns how many images were processed and skipped (by reason). With
    ``strict``, the first unreadable image raises ``DataError`` (after the
    blocks before it are safely written). Once ``stop.requested``, no further
    batch is started: ``stopped`` says whether blocks were left to do.
    """
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    stats = BlockStats()
    bg = _WriterThread(writer)
    try:
        with torch.inference_mode():
            for block, (rows, images, codes, details) in zip(blocks, loader, strict=True):
                codes = codes.numpy().astype(np.uint8)
                if codes.any():
                    for r, c, d in zip(rows.tolist(), codes.tolist(), details):
                        if not c:
                            continue
                        reason = SKIP_REASONS[c]
                        if strict:
                            raise DataError(f"image {ids[r]!r} is {reason}: {d} (--strict stops here; "
                                            "drop it to skip and record bad images)")
                        shown = sum(stats.skipped.values())
                        if shown < _MAX_SKIP_WARNINGS:
                            log.warning("skipping %s (%s: %s)", ids[r], reason, d)
                        elif shown == _MAX_SKIP_WARNINGS:
                            log.warning("more images skipped: counted in the summary, listed by mcpipe inspect")
                        stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
                images = images.to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
                with autocast:
                    feats = model(images)
                feats = feats.float()
                event = None
                if cuda:
                    host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
                    host.copy_(feats, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    feats = host
                bg.put((block, feats, event, codes))
                stats.images += len(codes)
                if on_batch is not None:
                    on_batch(len(codes))
                if stop is not None and stop.requested and block != blocks[-1]:
                    stats.stopped = True
                    break
    finally:
        bg.close()
    return stats
