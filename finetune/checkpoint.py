"""``RUN/checkpoint.pt`` of ``mcpipe finetune``: everything a ``--resume`` needs, at an epoch's end or inside one.

This module is the one owner of the file: it writes it (atomically, through
``mcpipe.atomic.save_atomic``: a failed write, a full disk say, leaves the
previous checkpoint as it was and no temporary behind) and reads it back,
refusing with one line what is not ours: an unreadable or truncated file, a
file of another format, a checkpoint of another version (version 1 held no
position inside an epoch), one written with another config, or one written
inside an epoch by another number of processes (their batches would differ).

A checkpoint inside an epoch holds the position in it (``step`` batches done
by every process) and the epoch's running sums per process (``partial``), so
the resumed epoch ends with exactly the loss, image and replacement counts of
an uninterrupted one: each process goes on adding to its own sum, in the same
order. Loading is strict (``weights_only=True``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from mcpipe import __version__
from mcpipe.atomic import save_atomic
from mcpipe.errors import ConfigError, DataError
from mcpipe.loading import load_problem
from mcpipe.records import FinetuneEpoch

FORMAT = "mcpipe-finetune-checkpoint"
VERSION = 2
NAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    """What ``checkpoint.pt`` holds (besides ``format``, ``version`` and the ``mcpipe`` version that wrote it)."""

    model: dict  # the Net's state_dict (backbone, cleaner, classifier)
    optimizer: dict  # the phase's SGD
    scheduler: dict  # the phase's per-step learning-rate schedule
    epoch: int  # epochs completed
    step: int  # batches each process has done of the next epoch (0 at an epoch's end)
    phase: str  # the phase of the epoch in progress, or of the last one completed when step is 0
    history: list[FinetuneEpoch]  # metrics.json's rows of the completed epochs
    start: FinetuneEpoch | None  # with --head: the evaluation before any step (epoch 0)
    seconds: float  # wall time of the run so far
    replaced: int  # unreadable images read in place of others, completed epochs
    partial: dict | None  # inside an epoch: {"loss", "images", "replaced"}, each a list with one sum per process
    partial_seconds: float  # inside an epoch: the training time of its steps so far
    world: int  # processes that trained (torchrun's WORLD_SIZE)
    config: str  # the run's config.toml

    @property
    def inside_epoch(self) -> bool:
        return self.step > 0


def path_of(out: Path) -> Path:
    return out / NAME


def save(ckpt: Checkpoint, out: Path) -> None:
    """Write ``out/checkpoint.pt`` atomically; a failed write is a one-line DataError and keeps the old file."""
    state = {f.name: getattr(ckpt, f.name) for f in fields(ckpt)}  # not asdict: it would deep-copy the tensors
    state["history"] = [row.to_dict() for row in ckpt.history]  # plain values: weights_only loading reads them
    state["start"] = None if ckpt.start is None else ckpt.start.to_dict()
    save_atomic({"format": FORMAT, "version": VERSION, "mcpipe": __version__, **state}, path_of(out))


def load(out: Path, device: torch.device, config_text: str, *, world: int = 1) -> Checkpoint:
    """``out/checkpoint.pt``, checked: ours, this version, this config, and (inside an epoch) ``world``
    processes. Each refusal is one line (DataError; ConfigError for a config or a process count that differ)."""
    path = path_of(out)
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled objects weights_only refuses
        raise DataError(f"--resume: {path} cannot be read: {load_problem(exc)}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise DataError(f"--resume: {path} is not an mcpipe finetune checkpoint")
    version = saved.get("version", 1)  # version 1 had no version key
    if version != VERSION:
        by = f"mcpipe {saved['mcpipe']}" if isinstance(saved.get("mcpipe"), str) else "an earlier mcpipe"
        raise DataError(f"--resume: {path} is a version-{version} finetune checkpoint, written by {by}; this "
                        f"mcpipe ({__version__}) reads version {VERSION}: --overwrite to start again")
    missing = sorted({f.name for f in fields(Checkpoint)} - saved.keys())
    if missing:
        raise DataError(f"--resume: {path} is not an mcpipe finetune checkpoint (no {', '.join(missing)})")
    ckpt = Checkpoint(**{f.name: saved[f.name] for f in fields(Checkpoint)})
    ckpt.history = [FinetuneEpoch.from_dict(row) for row in ckpt.history]
    ckpt.start = None if ckpt.start is None else FinetuneEpoch.from_dict(ckpt.start)
    if ckpt.config != config_text:
        raise ConfigError(f"--resume: the config differs from the one {out} was started with")
    if ckpt.inside_epoch and ckpt.world != world:
        raise ConfigError(f"--resume: {path} was written inside epoch {ckpt.epoch + 1} by {ckpt.world} "
                          f"process(es) and this run has {world}: resume with {ckpt.world} (torchrun "
                          f"--nproc_per_node), or --overwrite to start again")
    return ckpt


class Clock:
    """When a checkpoint is due inside an epoch: ``seconds`` (``finetune.checkpoint_minutes`` x 60; 0 = never)
    after the last one, on ``time.monotonic`` (a clock change does not matter)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.restart()

    def restart(self) -> None:
        """A checkpoint was just written (or the run started)."""
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds
