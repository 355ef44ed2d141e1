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
labels and the weights of its chosen epoch are kept (:class:`EpochChooser`:
the latest epoch within a paired standard error of the best): the number of
epochs is chosen per head on validation.
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
TOLERANCE = 1.0  # paired standard errors within which a later epoch or a simpler candidate is preferred


@dataclass
class LinearFits:
    """H linear heads at their best epoch, in standardised feature space.

    Attributes:
        weight: (H, C, D) float32. bias: (H, C) float32.
        best_epoch: (H,) int, 1-based epoch whose weights are kept (:class:`EpochChooser`; the last epoch when
            no validation).
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

    def probabilities(self, features: Tensor, heads: list[int] | None = None) -> np.ndarray:
        """(M, D) features -> (M, len(heads), C) softmax probabilities (all heads when None)."""
        w = self.weight if heads is None else self.weight[heads]
        b = self.bias if heads is None else self.bias[heads]
        return probabilities(features, w, b, self.mean, self.std)


@torch.inference_mode()
def probabilities(features: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor) -> np.ndarray:
    """(M, D) features, H heads (weight (H, C, D), bias (H, C)) -> (M, H, C) softmax probabilities."""
    out = []
    for start in range(0, len(features), _EVAL_ROWS):
        z = _standardize(features[start:start + _EVAL_ROWS], mean, std)
        out.append(torch.softmax(_logits(z, weight, bias), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(weight), weight.shape[1]), np.float32)


def _standardize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x.to(torch.float32) - mean) / std


def _logits(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """z (B, D), weight (H, C, D), bias (H, C) -> (B, H, C)."""
    h, c, d = weight.shape
    return (z @ weight.reshape(h * c, d).T).view(-1, h, c) + bias


def _val_rows(z_val: Tensor, y_val: Tensor, weight: Tensor, bias: Tensor, gain: Tensor | None) -> Tensor:
    """(H, V) float32 score of every validation row: gain[prediction, given label], or 1/0 for a hit when gain
    is None."""
    out = []
    for start in range(0, len(z_val), _EVAL_ROWS):
        pred = _logits(z_val[start:start + _EVAL_ROWS], weight, bias).argmax(-1)  # (B, H)
        y = y_val[start:start + _EVAL_ROWS, None].expand_as(pred)
        out.append((pred == y).float() if gain is None else gain[pred, y].float())
    return torch.cat(out).T


class EpochChooser:
    """Early stopping that validation noise cannot fool: the *latest* epoch whose validation score is within
    ``TOLERANCE`` paired standard errors of the best so far.

    A validation split of a thousand noisy labels cannot tell two epochs a tenth of a point apart; picking the
    raw maximum then picks a premature epoch by chance. Epochs are compared on the same rows (paired: the
    standard error of the mean difference of row scores), and the later, longer-trained one is kept unless
    the best is clearly better -- as under heavy label noise, where later epochs fit the wrong labels. For
    H models at once: ``update`` takes (H, V) row scores and returns which models take this epoch.
    """

    def __init__(self, heads: int) -> None:
        self.best_rows: Tensor | None = None
        self.best_mean = torch.full((heads,), -float("inf"), dtype=torch.float64)
        self.chosen_mean = np.full(heads, np.nan)
        self.chosen_epoch = np.zeros(heads, dtype=np.int64)

    def update(self, epoch: int, rows: Tensor) -> np.ndarray:
        rows = rows.detach().to("cpu", torch.float64)
        mean = rows.mean(1)
        if self.best_rows is None:
            self.best_rows = rows.clone()
        better = mean > self.best_mean
        self.best_rows[better] = rows[better]
        self.best_mean[better] = mean[better]
        diff = self.best_rows - rows
        se = diff.std(1, unbiased=True).nan_to_num(0.0) / max(rows.shape[1], 1) ** 0.5
        take = (diff.mean(1) <= TOLERANCE * se + 1e-12).numpy()
        self.chosen_mean[take] = mean.numpy()[take]
        self.chosen_epoch[take] = epoch + 1
        return take


def fit_linear_heads(features: Tensor, rows: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                     weight_decay: np.ndarray, *, num_classes: int, mean: Tensor, std: Tensor, train: TrainConfig,
                     epochs: int | None = None, val: tuple[Tensor, np.ndarray] | None = None,
                     gain: np.ndarray | None = None, seed: int = 0,
                     on_epoch: Callable[[int, Tensor, Tensor, np.ndarray], None] | None = None) -> LinearFits:
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
        on_epoch: called after every epoch with (epoch, weight (H, C, D), bias (H, C), mean loss (H,)), to report.

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
    chooser = EpochChooser(h)
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
            if z_val is None:
                take = np.ones(h, dtype=bool)
                chooser.chosen_epoch[:] = epoch + 1
            else:
                scores = _val_rows(z_val, y_val, weight, bias, gain_t)
                curves[epoch] = scores.mean(1).cpu().numpy()
                take = chooser.update(epoch, scores)
            if take.any():
                idx = torch.from_numpy(np.flatnonzero(take)).to(device)
                best_w[idx] = weight[idx]
                best_b[idx] = bias[idx]
        if on_epoch is not None:
            on_epoch(epoch, weight.detach(), bias.detach(), losses[epoch])
    return LinearFits(best_w, best_b, chooser.chosen_epoch, chooser.chosen_mean, curves, losses, mean, std)
