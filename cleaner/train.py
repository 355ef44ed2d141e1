"""Training and scoring of the head on cached features.

``features`` are an (M, D) float16 or float32 tensor kept on the device;
batches are gathered by row index and cast to float32 per batch.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from mcpipe.cleaner.model import Head
from mcpipe.cleaner.sampler import SubsetSampler
from mcpipe.config import TrainConfig

_EVAL_ROWS = 8192


def make_optimizer(head: Head, t: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """SGD with momentum and the paper's step schedule (one definition for train-head and its benchmark).

    Fused: one pass over each parameter, its gradient and momentum per step (the unfused
    update makes five, a fifth of a CPU step at the paper's Food-101N settings).
    """
    optimizer = torch.optim.SGD(head.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                fused=True)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_step, gamma=t.lr_gamma)


def train_one_epoch(head: Head, features: torch.Tensor, labels: torch.Tensor, sampler: SubsetSampler, epoch: int,
                    optimizer: torch.optim.Optimizer, *, on_batch: Callable[[int, float], None] | None = None) -> dict:
    """One epoch of K x N subset batches. ``labels``: (M,) the given (noisy) labels on the device.

    Returns ``{"loss": mean batch loss, "images": images drawn, "seconds"}``.
    """
    head.train()
    device = features.device
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no wait per step
    batches = images = pending = 0
    start = time.perf_counter()
    for rows in sampler.epoch(epoch):
        idx = torch.from_numpy(rows).to(device)                  # (K, N)
        v = features.index_select(0, idx.reshape(-1)).reshape(*idx.shape, -1)  # (K, N, D) store dtype
        y = labels[idx[:, 0]]                                      # (K,) all N share the label
        loss, _ = head.subset_loss(v, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        batches += 1
        images += idx.numel()
        pending += idx.numel()
        if on_batch is not None and (device.type == "cpu" or batches % 16 == 0):  # a GPU waits only every 16
            on_batch(pending, float(loss.detach()))
            pending = 0
    if on_batch is not None and pending:
        on_batch(pending, float(loss.detach()))
    mean = float(total) / max(batches, 1)
    return {"loss": mean, "images": images, "seconds": time.perf_counter() - start}


@torch.inference_mode()
def predict(head: Head, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cleaner removed: (M, D) features -> (predicted class (M,), probabilities (M, C))."""
    head.eval()
    probs = []
    for start in range(0, len(features), _EVAL_ROWS):
        probs.append(torch.softmax(head(features[start:start + _EVAL_ROWS]), dim=1).cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros((0, head.num_classes), np.float32)
    return p.argmax(1), p


@torch.inference_mode()
def alpha_scores(head: Head, features: torch.Tensor, labels: np.ndarray, *, subset_size: int, repeats: int,
                 seed: int) -> np.ndarray:
    """Each image's mean alpha over ``repeats`` random subsets of its (given) class.

    In every repeat each class's images are shuffled and cut into subsets of
    N; a last short subset is filled with other random images of the class.
    Returns (M,) float; for a class with one image alpha of a 1-subset.
    """
    head.eval()
    rng = np.random.default_rng(seed)
    total = np.zeros(len(labels))
    count = np.zeros(len(labels))
    members = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    for _ in range(repeats):
        groups = []
        for rows in members:
            if len(rows) == 0:
                continue
            perm = rng.permutation(rows)
            short = -len(perm) % subset_size
            if short:
                perm = np.concatenate([perm, rng.choice(rows, size=short, replace=len(rows) < short)])
            groups.append(perm.reshape(-1, subset_size))
        subsets = np.concatenate(groups)
        for start in range(0, len(subsets), _EVAL_ROWS // subset_size):
            part = subsets[start:start + _EVAL_ROWS // subset_size]
            idx = torch.from_numpy(part).to(features.device)
            v = features.index_select(0, idx.reshape(-1)).reshape(*idx.shape, -1)
            _, alpha = head.set_logits(v)
            np.add.at(total, part.reshape(-1), alpha.cpu().numpy().reshape(-1))
            np.add.at(count, part.reshape(-1), 1)
    return total / np.maximum(count, 1)


@torch.inference_mode()
def set_accuracy(head: Head, features: torch.Tensor, labels: np.ndarray, *, subset_size: int, seed: int) -> float:
    """The paper's set mode: test images grouped by label into subsets of N,
    the trained cleaner applied, v_c classified; accuracy against the subsets' label."""
    head.eval()
    rng = np.random.default_rng(seed)
    subsets = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = len(rows) // subset_size * subset_size
        if n:
            subsets.append(rows[:n].reshape(-1, subset_size))
    if not subsets:
        return float("nan")
    rows = np.concatenate(subsets)
    idx = torch.from_numpy(rows).to(features.device)
    v = features.index_select(0, idx.reshape(-1)).reshape(*idx.shape, -1)
    logits, _ = head.set_logits(v)
    return float((logits.argmax(1).cpu().numpy() == labels[rows[:, 0]]).mean())
