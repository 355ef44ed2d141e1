"""One training epoch (``train_epoch``, given a phase's ``Training``: model, optimiser, schedule, labels) and
the evaluation of a split (``evaluate``), for ``mcpipe finetune``'s run loop (``mcpipe.finetune.loop``).

Both work under ``torchrun`` as on one process: the training loss, the image
counts and the evaluation counts are all-reduced, so every rank returns the
numbers of the whole epoch / the whole split.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mcpipe.extract.data import IndexImages, ignore_stop_signals
from mcpipe.distributed import DistInfo
from mcpipe.extract.preprocess import Preprocess, eval_transform
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.finetune.model import Net


@dataclass
class EpochState:
    """The epoch in progress on this process: how far it is and its running sums.

    A checkpoint inside the epoch holds it, so a resumed epoch goes on from ``step`` and ends with the numbers
    of an uninterrupted one: ``loss`` (float64, on the device while training) keeps being summed in the same
    order, batch after batch."""

    epoch: int  # the epoch's index in the run (0-based)
    steps: int  # batches of the whole epoch on this process
    step: int = 0  # batches done
    loss: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))  # sum of batch losses
    images: int = 0
    replaced: int = 0  # unreadable images read in place of others
    seconds: float = 0.0  # training time of the steps done


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The torch seed of one training step: random layers (dropout, EfficientNet's drop-connect) draw from
    torch's generator, so seeding it per (seed, epoch, step, rank) makes a step's draws independent of where
    the run was started or resumed."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])


@dataclass
class Training:
    """What every step of a phase uses besides its batch (made by the run loop when a phase begins)."""

    net: Net
    model: torch.nn.Module  # ``net`` or its DistributedDataParallel wrapper (re-made when what trains changes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # stepped after every optimiser step
    labels: torch.Tensor  # (N,) the given label of every row trained on, on ``device``
    cleaner: bool  # every K·N batch is K subsets of N images of one label each, through the cleaner
    device: torch.device
    amp: bool  # bf16 autocast
    info: DistInfo
    seed: int  # finetune.seed: with (epoch, step, rank), the seed of each step's random layers


def train_epoch(t: Training, loader: DataLoader, state: EpochState, *, on_batch: Callable[[int, str], None],
                after_step: Callable[[EpochState], None] = lambda state: None) -> dict:
    """The rest of an epoch: the batches of ``loader`` (``(images, rows, rows read)``, from ``state.step`` on).

    ``state`` is brought up to date after every step, then ``after_step(state)`` runs (the run loop's
    checkpoints and stops; it may raise). Returns {"loss" (mean over batches), "images_per_second",
    "replaced" (unreadable images read in place of others)} of the whole epoch, summed over processes.
    """
    device = t.device
    t.net.train()
    n = t.net.head.cleaner.subset_size
    state.loss = state.loss.to(device)
    start, seconds_before = time.perf_counter(), state.seconds
    for images, rows, read in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        swapped = int((read != rows).sum())  # on the host copies: no wait for the device
        rows = rows.to(device, non_blocking=True)
        y = t.labels[rows.view(-1, n)[:, 0]] if t.cleaner else t.labels[rows]
        torch.manual_seed(step_seed(t.seed, state.epoch, state.step, t.info.rank))  # after the batch is read
        with torch.autocast(device.type, dtype=torch.bfloat16) if t.amp else contextlib.nullcontext():
            loss = t.model(images, y, cleaner=t.cleaner)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
        if t.scheduler is not None:
            t.scheduler.step()
        state.loss += loss.detach()  # no wait for the device either
        state.step += 1
        state.images += len(images)
        state.replaced += swapped
        state.seconds = seconds_before + time.perf_counter() - start
        if state.step % 4 == 0 or device.type == "cpu":
            on_batch(len(images) * (4 if device.type != "cpu" else 1), f"loss {float(loss.detach()):.3f} "
                     f"lr {t.optimizer.param_groups[-1]['lr']:.2g}")
        after_step(state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # queued kernels belong to this epoch's time
    state.seconds = seconds_before + time.perf_counter() - start
    return _epoch_stats(state, t.info, device)


def _epoch_stats(state: EpochState, info: DistInfo, device: torch.device) -> dict:
    """The epoch's mean loss, images per second and replaced images, summed over processes."""
    if info.enabled:
        agg = torch.tensor([float(state.loss), state.images, state.replaced], dtype=torch.float64, device=device)
        dist.all_reduce(agg)
        total_loss, images_all, replaced = float(agg[0]), int(agg[1]), int(agg[2])
        mean_loss = total_loss / max(state.step * info.world_size, 1)
    else:
        mean_loss, images_all, replaced = float(state.loss) / max(state.step, 1), state.images, state.replaced
    return {"loss": mean_loss, "images_per_second": images_all / max(state.seconds, 1e-9), "replaced": replaced}


def on_every_rank(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """``flags`` OR-ed over processes (one all-reduce of a few bytes), so that every rank takes the same
    decision at the same step; ``flags`` itself in a single process."""
    if not info.enabled:
        return flags
    t = torch.tensor(flags, dtype=torch.int32, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_partial(state: EpochState, info: DistInfo, device: torch.device) -> dict:
    """Every process's running sums of the epoch in progress: {"loss", "images", "replaced"}, each a list
    indexed by rank (a collective: every rank calls it at the same step)."""
    mine = torch.tensor([float(state.loss), state.images, state.replaced], dtype=torch.float64,
                        device=device if device.type == "cuda" else "cpu")
    parts = [mine]
    if info.enabled:
        parts = [torch.empty_like(mine) for _ in range(info.world_size)]
        dist.all_gather(parts, mine)
    rows = [p.cpu().tolist() for p in parts]
    return {"loss": [r[0] for r in rows], "images": [int(r[1]) for r in rows], "replaced": [int(r[2]) for r in rows]}


def resumed_state(epoch: int, steps: int, step: int, partial: dict | None, seconds: float, rank: int) -> EpochState:
    """This rank's ``EpochState`` from a checkpoint's position and ``partial`` sums (a fresh one at step 0)."""
    if not step or partial is None:
        return EpochState(epoch, steps)
    return EpochState(epoch, steps, step, torch.tensor(partial["loss"][rank], dtype=torch.float64),
                      partial["images"][rank], partial["replaced"][rank], seconds)


@torch.inference_mode()
def evaluate(net: Net, index: SplitIndex, pre: Preprocess, *, device: torch.device, amp: bool, batch_size: int,
             workers: int, info: DistInfo = DistInfo(), name: str = "test",
             clean: bool = False) -> tuple[dict, np.ndarray]:
    """Top-1 (and top-5 with >= 5 classes) of ``net`` with the cleaner removed against ``index.labels``;
    unreadable images left out. Under torchrun each process predicts a shard and the counts are summed.

    With ``clean``, also the top-1 against ``index.clean_labels`` on the images whose true label is known.
    Returns ({"<name>_top1", "<name>_images"[, "<name>_top5"][, "<name>_clean_top1", "<name>_clean_images"]},
    (C, C) int64 confusion counts against ``index.labels``).
    """
    net.eval()
    images = IndexImages(index, eval_transform(pre), image_size=pre.image_size, min_size=pre.resize)
    shard = torch.utils.data.Subset(images, range(info.rank, len(images), info.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)
    labels, truth = torch.from_numpy(index.labels), torch.from_numpy(index.clean_labels)
    k = min(5, len(index.classes))
    c = len(index.classes)
    counts = torch.zeros(5 + c * c, dtype=torch.float64)  # top-1, top-5, seen, clean top-1, clean seen, confusion
    for rows, x, codes, _ in loader:
        ok = codes == 0
        if not ok.any():
            continue
        x = x[ok].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            logits = net(x).float().cpu()
        y, true = labels[rows[ok]], truth[rows[ok]]
        top = logits.topk(k, dim=1).indices
        known = true >= 0
        counts[:5] += torch.tensor([float((top[:, 0] == y).sum()), float((top == y[:, None]).any(1).sum()), len(y),
                                    float((top[known, 0] == true[known]).sum()), float(known.sum())],
                                   dtype=torch.float64)
        counts[5:] += torch.bincount(y * c + top[:, 0], minlength=c * c).double()
    if info.enabled:
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    seen = max(float(counts[2]), 1.0)
    out = {f"{name}_top1": float(counts[0]) / seen, f"{name}_images": int(counts[2])}
    if len(index.classes) >= 5:
        out[f"{name}_top5"] = float(counts[1]) / seen
    if clean and counts[4] > 0:
        out[f"{name}_clean_top1"] = float(counts[3]) / float(counts[4])
        out[f"{name}_clean_images"] = int(counts[4])
    return out, counts[5:].round().long().reshape(c, c).numpy()
