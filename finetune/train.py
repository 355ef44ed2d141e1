"""One training epoch and the evaluation of a split, for ``mcpipe finetune``'s run loop.

Both work under ``torchrun`` as on one process: the training loss, the image
counts and the evaluation counts are all-reduced, so every rank returns the
numbers of the whole epoch / the whole split.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mcpipe.extract.data import IndexImages
from mcpipe.distributed import DistInfo
from mcpipe.extract.preprocess import Preprocess, eval_transform
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.finetune.model import Net


def train_epoch(model: torch.nn.Module, net: Net, loader: DataLoader, labels: torch.Tensor, *, cleaner: bool,
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                device: torch.device, amp: bool, info: DistInfo,
                on_batch: Callable[[int, str], None]) -> dict:
    """One pass over ``loader`` (batches of ``(images, rows, rows read)``); ``labels`` (N,) indexed by row.

    ``model`` is ``net`` or its DistributedDataParallel wrapper. With ``cleaner`` every K·N batch is K
    subsets of N images of one label each. Returns {"loss" (mean over batches), "images_per_second",
    "replaced" (unreadable images read in place of others)}, summed over processes.
    """
    net.train()
    n = net.head.cleaner.subset_size
    total = torch.zeros((), dtype=torch.float64, device=device)
    batches = images_seen = replaced = 0
    start = time.perf_counter()
    for images, rows, read in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        replaced += int((read != rows).sum())  # on the host copies: no wait for the device
        rows = rows.to(device, non_blocking=True)
        y = labels[rows.view(-1, n)[:, 0]] if cleaner else labels[rows]
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = model(images, y, cleaner=cleaner)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach()
        batches += 1
        images_seen += len(images)
        if batches % 4 == 0 or device.type == "cpu":
            on_batch(len(images) * (4 if device.type != "cpu" else 1), f"loss {float(loss.detach()):.3f} "
                     f"lr {optimizer.param_groups[-1]['lr']:.2g}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # queued kernels belong to this epoch's time
    seconds = time.perf_counter() - start
    if info.enabled:
        agg = torch.tensor([float(total), images_seen, replaced], dtype=torch.float64, device=device)
        dist.all_reduce(agg)
        total_loss, images_all, replaced = float(agg[0]), int(agg[1]), int(agg[2])
        mean_loss = total_loss / max(batches * info.world_size, 1)
    else:
        mean_loss, images_all = float(total) / max(batches, 1), images_seen
    return {"loss": mean_loss, "images_per_second": images_all / max(seconds, 1e-9), "replaced": replaced}


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
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
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
