"""Many linear softmax heads (N = 1) trained together, in one pass over cached features.

The automatic search (:mod:`mcpipe.cleaner.auto`) needs a dozen or more plain
softmax classifiers on the same features: one per weight decay, one per
cross-validation fold, one per cleaned label set. Each is tiny (D x C);
trained one after the other, nearly all the time would go into gathering and
standardising the same rows again. Here H heads share every batch: one
(B, D) x (D, H C) product gives logits (B, H, C); head h has its own labels
``labels[h]``, row weights ``weights[h]`` (0 = the row is not in its training
set: another fold's rows, a dropped image) and its own weight decay. With SGD
an L2 term wd/2 |theta|^2 in the loss is exactly torch's ``weight_decay``, so
each head follows the trajectory it would follow alone on the same batches;
the heads never interact (the loss is a sum of per-head terms).

Every epoch each head is scored on a validation set against its (given)
labels and its best epoch's weights are kept (early stopping, ties to the
earlier epoch): the number of epochs is chosen per head on validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mcpipe.config import TrainConfig

_EVAL_ROWS = 8192


@dataclass
class LinearFits:
    """H linear heads at their best epoch, in standardised feature space.

    Attributes:
        weight: (H, C, D) float32. bias: (H, C) float32.
        best_epoch: (H,) int, 1-based epoch whose weights are kept (the last epoch when no validation).
        val_accuracy: (H,) float, validation score at ``best_epoch`` (accuracy, or the ``gain`` score; NaN
            without validation).
        curves: (E, H) float, validation score after every epoch.
        losses: (E, H) float, each head's mean training loss per epoch (without the L2 term).
        mean, std: (D,) float32 standardisation the heads were trained under.
    """

    weight: Tensor
    bias: Tensor
    best_epoch: np.ndarray
    val_accuracy: np.ndarray
    curves: np.ndarray
    losses: np.ndarray
    mean: Tensor
    std: Tensor

    @torch.inference_mode()
    def probabilities(self, features: Tensor, heads: list[int] | None = None) -> np.ndarray:
        """(M, D) features -> (M, len(heads), C) softmax probabilities (all heads when None)."""
        w = self.weight if heads is None else self.weight[heads]
        b = self.bias if heads is None else self.bias[heads]
        out = []
        for start in range(0, len(features), _EVAL_ROWS):
            z = _standardize(features[start:start + _EVAL_ROWS], self.mean, self.std)
            out.append(torch.softmax(_logits(z, w, b), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(w), w.shape[1]), np.float32)


def _standardize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x.to(torch.float32) - mean) / std


def _logits(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """z (B, D), weight (H, C, D), bias (H, C) -> (B, H, C)."""
    h, c, d = weight.shape
    return (z @ weight.reshape(h * c, d).T).view(-1, h, c) + bias


def _val_score(z_val: Tensor | None, y_val: Tensor | None, weight: Tensor, bias: Tensor,
               gain: Tensor | None) -> Tensor | None:
    """(H,) mean of gain[prediction, given label] over the validation rows; accuracy when gain is None (= I)."""
    if z_val is None or len(z_val) == 0:
        return None
    total = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    for start in range(0, len(z_val), _EVAL_ROWS):
        pred = _logits(z_val[start:start + _EVAL_ROWS], weight, bias).argmax(-1)  # (B, H)
        y = y_val[start:start + _EVAL_ROWS, None].expand_as(pred)
        total += (pred == y).sum(0) if gain is None else gain[pred, y].sum(0, dtype=torch.float64)
    return total / len(z_val)


def fit_linear_heads(features: Tensor, rows: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                     weight_decay: np.ndarray, *, num_classes: int, mean: Tensor, std: Tensor, train: TrainConfig,
                     epochs: int | None = None, val: tuple[Tensor, np.ndarray] | None = None,
                     gain: np.ndarray | None = None, seed: int = 0,
                     on_epoch: Callable[[int, Tensor, Tensor], None] | None = None) -> LinearFits:
    """Train H softmax heads on ``features[rows]`` with SGD, the step schedule of ``train``.

    Args:
        features: (M_all, D) float16/float32 on the device; ``rows`` (M,) int64 the rows trained on.
        labels: (H, M) int64 each head's labels of those rows. weights: (H, M) row weights >= 0
            (0 = not trained on). weight_decay: (H,) L2 coefficient per head.
        num_classes: C. mean, std: (D,) standardisation.
        train: lr, momentum, lr_step, lr_gamma, batch_size (and epochs unless ``epochs`` is given).
        val: (validation features (V, D), given labels (V,)) scored every epoch, or None.
        gain: (C, C) score of predicting p for a row labelled g, ``gain[p, g]``; None = accuracy (the identity).
            With the inverse of an estimated noise matrix it estimates accuracy against the true labels
            (:func:`mcpipe.cleaner.issues.corrected_gain`).
        seed: order of the rows, one permutation per epoch.
        on_epoch: called after every epoch with (epoch, weight (H, C, D), bias (H, C)), e.g. to report.

    Returns the heads at their best validation epoch (at the last epoch without ``val``).
    """
    device = features.device
    h = len(weight_decay)
    if labels.shape != weights.shape or labels.shape != (h, len(rows)):
        raise ValueError(f"labels {labels.shape} and weights {weights.shape} must both be ({h}, {len(rows)})")
    d = features.shape[1]
    epochs = train.epochs if epochs is None else epochs
    weight = torch.zeros(h, num_classes, d, device=device, requires_grad=True)
    bias = torch.zeros(h, num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([weight, bias], lr=train.lr, momentum=train.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.lr_step, gamma=train.lr_gamma)
    wd = torch.as_tensor(np.asarray(weight_decay, dtype=np.float32), device=device)
    rows_t = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)            # (H, M)
    w_rows = torch.from_numpy(np.asarray(weights, dtype=np.float32)).to(device)    # (H, M)
    mean, std = mean.to(device), std.to(device)
    z_val = y_val = None
    if val is not None and len(val[1]):
        z_val = _standardize(val[0], mean, std)
        y_val = torch.from_numpy(np.asarray(val[1], dtype=np.int64)).to(device)
    gain_t = None if gain is None else torch.as_tensor(np.asarray(gain), dtype=torch.float64, device=device)
    best_w, best_b = weight.detach().clone(), bias.detach().clone()
    best_acc = np.full(h, -1.0)
    best_epoch = np.zeros(h, dtype=np.int64)
    curves = np.full((epochs, h), np.nan)
    losses = np.zeros((epochs, h))
    batch = max(1, train.batch_size)
    for epoch in range(epochs):
        total, batches = torch.zeros(h, dtype=torch.float64, device=device), 0
        order = torch.from_numpy(np.random.default_rng([seed % (1 << 63), epoch]).permutation(len(rows))).to(device)
        for start in range(0, len(order), batch):
            local = order[start:start + batch]
            z = _standardize(features.index_select(0, rows_t[local]), mean, std)      # (B, D)
            logits = _logits(z, weight, bias)                                          # (B, H, C)
            yb, wb = y[:, local].T, w_rows[:, local].T                                 # (B, H)
            ce = F.cross_entropy(logits.reshape(-1, num_classes), yb.reshape(-1), reduction="none").view_as(wb)
            per_head = (ce * wb).sum(0) / wb.sum(0).clamp_min(1.0)                     # (H,)
            penalty = 0.5 * (wd * (weight.square().sum((1, 2)) + bias.square().sum(1))).sum()
            optimizer.zero_grad(set_to_none=True)
            (per_head.sum() + penalty).backward()
            optimizer.step()
            total += per_head.detach()
            batches += 1
        losses[epoch] = (total / max(batches, 1)).cpu().numpy()
        scheduler.step()
        with torch.no_grad():
            acc = _val_score(z_val, y_val, weight, bias, gain_t)
            if acc is None:
                best_w.copy_(weight)
                best_b.copy_(bias)
                best_epoch[:] = epoch + 1
            else:
                acc = acc.cpu().numpy()
                curves[epoch] = acc
                better = acc > best_acc
                if better.any():
                    idx = torch.from_numpy(np.flatnonzero(better)).to(device)
                    best_w[idx] = weight[idx]
                    best_b[idx] = bias[idx]
                    best_acc[better] = acc[better]
                    best_epoch[better] = epoch + 1
        if on_epoch is not None:
            on_epoch(epoch, weight.detach(), bias.detach())
    val_acc = best_acc if z_val is not None else np.full(h, np.nan)
    return LinearFits(best_w, best_b, best_epoch, val_acc, curves, losses, mean, std)
