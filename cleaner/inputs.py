"""What one head run trains and chooses on: its labels (the store's or ``labels.file``'s, then ``[noise]`` on
top) and its validation split (a hold-out of train.h5, or a val.h5 store beside it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from mcpipe.cleaner.noise import noise_from_config
from mcpipe.cleaner.prepare import Prepared
from mcpipe.cleaner.split import holdout
from mcpipe.config import Config
from mcpipe.labels import LabelFile, read_label_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunLabels:
    """The labels one head run trains with.

    ``given`` (M,): trained and chosen on (a row the label file drops keeps the store's label and is neither);
    ``clean`` (M,): known true labels, -1 unknown (metrics only); ``before_noise`` (M,): the labels synthetic
    noise was applied to; ``keep`` (M,) bool: rows that are not dropped; ``file``: the label file, if any."""

    given: np.ndarray
    clean: np.ndarray
    before_noise: np.ndarray
    keep: np.ndarray
    file: LabelFile | None = None

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.keep).astype(np.int64)


def run_labels(cfg: Config, prep: Prepared) -> RunLabels:
    """The store's labels, or ``labels.file``'s, then ``[noise]`` on top of them."""
    store = prep.train
    labels, clean, keep, file = store.labels.copy(), store.clean_labels.copy(), np.ones(len(store.labels), bool), None
    if cfg.labels.file:
        file = read_label_file(cfg.labels.file, store.ids, store.classes, what=f"{store.path}")
        keep = file.keep
        labels = np.where(keep, file.labels, labels)
        if file.clean_labels is not None:
            clean = file.clean_labels.copy()
        if file.dropped:
            log.info("%s drops %d of %d training images: left out of training and validation",
                     cfg.labels.file, file.dropped, len(keep))
    if cfg.noise.kind == "none":
        return RunLabels(labels, clean, labels, keep, file)
    noisy = noise_from_config(labels, store.num_classes, cfg.noise, features=store.features)
    return RunLabels(noisy, labels.copy(), labels, keep, file)  # the labels before noise are the known clean ones


@dataclass
class Validation:
    """The split every choice is made on: hold-out rows of train.h5, or a val.h5 store.

    ``rows``: the hold-out's rows in the training store (None for a val.h5 store); ``x`` (V, D) on the device;
    ``given`` (V,) labels chosen against; ``clean`` (V,) true labels, -1 unknown (reported, never used)."""

    source: str
    x: torch.Tensor
    given: np.ndarray
    clean: np.ndarray
    rows: np.ndarray | None = None


def validation_split(cfg: Config, prep: Prepared, labels: RunLabels) -> tuple[np.ndarray, Validation | None]:
    """(rows trained on, the validation split or None); rows a label file drops are in neither."""
    given, clean = labels.given, labels.clean
    everything = labels.kept
    if prep.val is not None:
        v = prep.val
        keep = np.ones(len(v.labels), bool) if v.verified is None else v.verified == 1  # human-checked right
        x = prep.val_x if keep.all() else prep.val_x[torch.from_numpy(np.flatnonzero(keep)).to(prep.device)]
        # Food-101N's verified_val images are also in its training set: never train on what chooses
        shared = np.isin(np.asarray(prep.train.ids, dtype=object), np.asarray(v.ids, dtype=object)[keep])
        if shared.any():
            log.info("%d training images are also in %s: left out of training", shared.sum(), v.path.name)
        return everything[~shared[everything]], Validation(v.path.name, x, v.labels[keep], v.clean_labels[keep])
    if cfg.train.val_fraction == 0:
        return everything, None
    fit_rows, val_rows = (everything[r] for r in holdout(given[everything], cfg.train.val_fraction,
                                                          seed=cfg.train.seed))
    if len(val_rows) == 0:
        return everything, None
    x = prep.train_x[torch.from_numpy(val_rows).to(prep.device)]
    return fit_rows, Validation(f"hold-out of {cfg.train.val_fraction:g} of train.h5", x, given[val_rows],
                                clean[val_rows], val_rows)


