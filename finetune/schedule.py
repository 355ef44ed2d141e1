"""Learning-rate schedules of ``mcpipe finetune``, as a factor of each group's base rate per optimiser step.

Each phase runs its own schedule over its ``epochs x steps_per_epoch`` steps:

* ``cosine``: a linear warm-up over the first ``warmup_epochs`` (from 1/``steps`` of the rate), then half a
  cosine down to 0 at the phase's last step -- the usual fine-tuning schedule (torchvision's references,
  timm): the last epoch ends at a small rate, so the weights exported are not a noisy high-rate iterate;
* ``step``: the same warm-up, then the rate divided by ``1 / lr_gamma`` every ``lr_step`` epochs.

Pure functions of the step, so a run resumed from a checkpoint (which holds the step count) continues on the
same curve.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def lr_factor(step: int, *, schedule: str, steps_per_epoch: int, epochs: int, warmup_epochs: float,
              lr_step: int, lr_gamma: float) -> float:
    """The factor applied to the base learning rate at optimiser step ``step`` (0-based) of a phase."""
    total = max(epochs * steps_per_epoch, 1)
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":
        return lr_gamma ** (step // max(lr_step * steps_per_epoch, 1))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def phase_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, steps_per_epoch: int, epochs: int,
                    warmup_epochs: float, lr_step: int, lr_gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped after every optimiser step (its state_dict holds the step count)."""
    factor = partial(lr_factor, schedule=schedule, steps_per_epoch=steps_per_epoch, epochs=epochs,
                     warmup_epochs=warmup_epochs, lr_step=lr_step, lr_gamma=lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
