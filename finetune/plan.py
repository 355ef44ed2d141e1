"""What ``mcpipe finetune`` trains, epoch by epoch, computed from ``[finetune]`` before the first step.

Phases, each optional: ``cleaner`` (K x N subsets through the cleaner, the first ``freeze_epochs`` with the
backbone frozen), ``unload`` (cleaner dropped, plain softmax on the same noisy split) and ``clean`` (plain
softmax on ``clean_split``). ``epoch_schedule`` lays them out as one list with an entry per epoch of the
run, so the training loop is a plain ``for epoch in range(start, len(schedule))`` and a resumed run starts
at the checkpoint's epoch. Pure functions of the config: every rank and every ``--resume`` gets the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcpipe.config import Config


@dataclass(frozen=True)
class Phase:
    """A run of epochs with one data set, sampler, optimiser and learning-rate schedule."""

    name: str  # cleaner | unload | clean
    epochs: int
    split: str  # the split trained on
    cleaner: bool  # K x N subsets through the cleaner (else plain softmax on shuffled batches)


@dataclass(frozen=True)
class Epoch:
    """One epoch of the run."""

    index: int  # in the run, 0-based (history's "epoch" is index + 1)
    phase: Phase
    in_phase: int  # in its phase, 0-based
    backbone_trains: bool  # the backbone gets gradients (else only cleaner and classifier learn)


def plan(cfg: Config) -> list[Phase]:
    """The phases with at least one epoch, in training order."""
    f = cfg.finetune
    phases = [Phase("cleaner", f.epochs, f.train_split, True), Phase("unload", f.unload_epochs, f.train_split, False),
              Phase("clean", f.clean_epochs, f.clean_split, False)]
    return [p for p in phases if p.epochs > 0]


def epoch_schedule(cfg: Config) -> list[Epoch]:
    """Every epoch of the run, in order: ``plan(cfg)``'s phases one after the other. The backbone trains when
    ``backbone_lr`` > 0, except in the cleaner phase's first ``freeze_epochs``."""
    f = cfg.finetune
    schedule: list[Epoch] = []
    for phase in plan(cfg):
        for k in range(phase.epochs):
            trains = f.backbone_lr > 0 and not (phase.name == "cleaner" and k < f.freeze_epochs)
            schedule.append(Epoch(len(schedule), phase, k, trains))
    return schedule
