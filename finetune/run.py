"""``mcpipe finetune``: backbone + MetaCleaner + classifier trained end to end on images.

This module sets a run up and finishes it; the epochs themselves (phases, evaluations, checkpoints, stops,
the best epoch's export) are ``mcpipe.finetune.loop``'s, laid out by ``mcpipe.finetune.plan``. Set-up, all
before the first step: the splits and their labels (``labels.file``, synthetic ``[noise]``), the validation
set, the network (a new head, or ``--head``'s, checked against the backbone and data set), the run folder's
lock and config check, and with ``--resume`` the checkpoint (``mcpipe.finetune.checkpoint``). At the end:
``model.pt`` + ``model.json`` of the last epoch (``finetune.export = "last"`` or no validation set; the best
epoch's were written when it was reached) and ``metrics.json``.

Model selection is on validation only, never on the test split: the validation set is ``val_split`` when the
data has it, else a seeded stratified hold-out of ``val_fraction`` of ``train_split``
(``stratified_holdout``; those images are not trained on). ``test_accuracy`` is the exported model's test
top-1 and ``exported_epoch`` its epoch.

Run folder: ``config.toml``, ``checkpoint.pt``, ``metrics.json``, ``model.pt``, ``model.json``,
``confusion.csv`` (test split, the exported model).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mcpipe.cleaner.head_file import load_head
from mcpipe.cleaner.model import Head
from mcpipe.cleaner.noise import noise_from_config
from mcpipe.cleaner.split import stratified_holdout
from mcpipe.config import Config, to_toml
from mcpipe.devices import resolve_device
from mcpipe.distributed import DistInfo, barrier, init, shutdown
from mcpipe.errors import ConfigError, DataError
from mcpipe.extract.backbones import build_backbone
from mcpipe.extract.preprocess import preprocess_for
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.extract.sources.registry import available_splits, load_index
from mcpipe.finetune import checkpoint, loop
from mcpipe.finetune.loop import Job, write_model
from mcpipe.finetune.model import Net
from mcpipe.labels import labels_toml, read_label_file
from mcpipe.loading import load_state_checked
from mcpipe.records import FinetuneMetrics, write_metrics
from mcpipe.rundir import check_run_dir, start_run_dir
from mcpipe.stopping import StopRequest, stop_on_signals

log = logging.getLogger(__name__)

RUN_FILES = ("config.toml", "checkpoint.pt", "metrics.json", "model.pt", "model.json", "confusion.csv")
SECTIONS = ("data", "extract", "noise", "cleaner", "finetune")


def run(cfg: Config, *, out: str | Path, head: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, progress: bool = False) -> FinetuneMetrics:
    """Train, evaluate and export into ``out``; returns the metrics (also in ``out/metrics.json``).
    SIGTERM/SIGUSR1 stop it resumably (``Preempted``, see ``mcpipe.finetune.loop``)."""
    info = DistInfo.from_env()
    device = resolve_device(cfg.finetune.device, key="finetune.device", local_rank=info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init(info, device)
    try:
        with stop_on_signals() as stop:
            return _run(cfg, info, device, Path(out), None if head is None else Path(head), resume, overwrite,
                        progress, stop)
    finally:
        shutdown(info)


def _run(cfg: Config, info: DistInfo, device: torch.device, out: Path, head_run: Path | None, resume: bool,
         overwrite: bool, progress: bool, stop: StopRequest) -> FinetuneMetrics:
    config_text = labels_toml(cfg.labels.file) + to_toml(cfg, SECTIONS)
    check_run_dir(out, config_text, RUN_FILES, resume=resume, overwrite=overwrite)  # before any slow work
    job = _prepare(cfg, info, device, out, config_text, head_run, progress, stop)
    # the run folder's lock is released however this ends: finished, refused, stopped or interrupted
    with (start_run_dir(out, config_text, RUN_FILES, resume=resume, overwrite=overwrite) if info.is_main else
          contextlib.nullcontext()):
        barrier(info)
        ckpt = checkpoint.load(out, device, config_text, world=info.world_size) if resume else None
        if ckpt is not None:
            load_state_checked(job.net, ckpt.model, what=f"--resume: {checkpoint.path_of(out)}",
                               hint="the data set's classes or the backbone changed since; --overwrite to start again")
        metrics = loop.train(job, ckpt, evaluate_start=head_run is not None)
        if info.is_main:
            if not job.keep_best:  # (the best epoch's model was written when it was reached; confusion.csv every epoch)
                write_model(job, metrics, None)
            write_metrics(metrics, out / "metrics.json")
    barrier(info)
    return metrics


def _prepare(cfg: Config, info: DistInfo, device: torch.device, out: Path, config_text: str, head_run: Path | None,
             progress: bool, stop: StopRequest) -> Job:
    """The splits, their labels and the network, checked before the run folder is touched."""
    f = cfg.finetune
    splits = available_splits(cfg.data)
    for key, split in (("finetune.train_split", f.train_split), ("finetune.clean_split", f.clean_split)):
        if split and split not in splits:
            raise ConfigError(f"{key} = {split!r} is not a split of {cfg.data.source} data in {cfg.data.root}: "
                              f"it has {', '.join(splits) or 'none'}")
    train, labels_record = _with_label_file(cfg, load_index(cfg.data, f.train_split), info)
    given = train.labels.copy() if cfg.noise.kind == "none" else noise_from_config(train.labels, len(train.classes),
                                                                                   cfg.noise)
    train, given, val = _validation(cfg, splits, train, given, info)
    test = load_index(cfg.data, f.test_split) if f.test_split in splits else None
    if test is None and f.test_split and info.is_main:
        log.warning("no %r split: test accuracy will not be measured", f.test_split)
    clean = load_index(cfg.data, f.clean_split) if f.clean_split else None
    for other in (val, test, clean):
        if other is not None and other.classes != train.classes:
            raise DataError(f"split {other.split!r} has other classes than {train.split!r}")

    backbone = build_backbone(cfg.extract.backbone, cfg.extract.weights, image_size=cfg.extract.image_size)
    pre = preprocess_for(cfg.extract.backbone, cfg.extract.image_size, cfg.extract.resize)
    head = _load_head(head_run, cfg, backbone.feature_dim, train.classes) if head_run else _new_head(
        cfg, backbone.feature_dim, len(train.classes))
    net = Net(backbone, head, freeze_bn=f.freeze_bn).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    amp = f.amp == "bf16" or (f.amp == "auto" and device.type == "cuda")
    return Job(cfg, info, device, out, config_text, net, backbone.provenance, pre, amp, train, given, val, test,
                clean, labels_record, progress, stop)


def _with_label_file(cfg: Config, train: SplitIndex, info: DistInfo) -> tuple[SplitIndex, dict | None]:
    """``train`` with ``labels.file``'s labels (and clean labels, when it has them), the rows it drops left
    out; and what metrics.json records of the file. The file must list exactly the split's ids (after
    ``data.limit``: extract and fine-tune with the same [data] to get the same ids)."""
    if not cfg.labels.file:
        return train, None
    file = read_label_file(cfg.labels.file, train.ids, train.classes,
                           what=f"{train.source} split {train.split!r} under {train.root}")
    clean = file.clean_labels if file.clean_labels is not None else train.clean_labels
    relabelled = replace(train, labels=np.where(file.keep, file.labels, train.labels), clean_labels=clean)
    if file.dropped and info.is_main:
        log.info("%s drops %d of %d training images: left out of training and validation", cfg.labels.file,
                 file.dropped, len(train))
    return relabelled.take(np.flatnonzero(file.keep)), file.record(train.labels)


def _validation(cfg: Config, splits: list[str], train: SplitIndex, given: np.ndarray,
                info: DistInfo) -> tuple[SplitIndex, np.ndarray, SplitIndex | None]:
    """(training rows, their given labels, the validation set or None) from the whole training split.

    The validation set's ``labels`` are the ones to select on: ``val_split``'s labels as the data gives them,
    or for a hold-out of ``val_fraction`` of the training split its given (noisy) labels. Its ``clean_labels``
    are the true ones where known (with synthetic noise, the original labels). Held-out rows are not trained on.
    """
    f = cfg.finetune
    if f.val_split and f.val_split in splits:
        return train, given, load_index(cfg.data, f.val_split)
    held = stratified_holdout(given, f.val_fraction, seed=f.seed)
    if len(held) == 0:
        if info.is_main:
            log.log(logging.WARNING if f.val_fraction > 0 else logging.INFO, "no validation set (no %r split, "
                    "val_fraction %g of %r held out): no best epoch is chosen", f.val_split, f.val_fraction,
                    f.train_split)
        return train, given, None
    keep = np.setdiff1d(np.arange(len(train)), held)
    truth = train.clean_labels if cfg.noise.kind == "none" else train.labels  # synthetic noise: originals are true
    val = replace(train.take(held), split=f"{train.split} hold-out", labels=given[held], clean_labels=truth[held])
    if info.is_main:
        log.info("validation: %s, so %d of the %d %r images are held out (val_fraction %g) and not trained on",
                 f"no {f.val_split!r} split" if f.val_split else "finetune.val_split is empty", len(held), len(train),
                 f.train_split, f.val_fraction)
    return train.take(keep), given[keep], val


def _new_head(cfg: Config, feature_dim: int, num_classes: int) -> Head:
    c = cfg.cleaner
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.finetune.seed)
        return Head(feature_dim, num_classes, subset_size=c.subset_size, hidden=c.hidden, weighting=c.weighting,
                    combine=c.combine)


def _load_head(run: Path, cfg: Config, feature_dim: int, classes: list[str]) -> Head:
    """The cleaner and classifier of a train-head run, checked against this backbone and data set."""
    saved = load_head(run)
    path = run / "head.pt" if run.is_dir() else run
    checks = (("backbone", saved.provenance.get("backbone"), cfg.extract.backbone),
              ("feature dimension", saved.feature_dim, feature_dim), ("class count", len(saved.classes), len(classes)),
              ("classes", saved.classes, classes))
    for what, theirs, ours in checks:
        if theirs != ours:
            raise DataError(f"--head {path} does not fit: its {what} is {theirs!s:.120} but this finetune's is "
                            f"{ours!s:.120} (extract.backbone / the data set)")
    head = saved.head
    if head.cleaner.subset_size != cfg.cleaner.subset_size:
        log.warning("the head was trained with N = %d subsets; finetune uses N = %d from it, not "
                    "cleaner.subset_size = %d", head.cleaner.subset_size, head.cleaner.subset_size,
                    cfg.cleaner.subset_size)
    return head
