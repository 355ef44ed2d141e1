"""The data sources by name, and the one way the pipeline builds a split's index."""

from __future__ import annotations

from typing import Protocol

from mcpipe.config import DataConfig
from mcpipe.errors import ConfigError
from mcpipe.extract.sources import (cifar10, cifar100, clothing1m, fashion_mnist, food101n, imagefolder, manifest,
                                     mnist, webdataset)
from mcpipe.extract.sources.base import SplitIndex, check_index, limit_index
from mcpipe.extract.sources.noisy_labels import apply_label_set


class Source(Protocol):
    """What a source module provides."""

    def list_splits(self, cfg: DataConfig) -> list[str]: ...

    def load_split(self, cfg: DataConfig, split: str) -> SplitIndex: ...


SOURCES: dict[str, Source] = {
    "imagefolder": imagefolder,
    "manifest": manifest,
    "food101n": food101n,
    "clothing1m": clothing1m,
    "fashion-mnist": fashion_mnist,
    "mnist": mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "webdataset": webdataset,
}


def get_source(cfg: DataConfig) -> Source:
    try:
        return SOURCES[cfg.source]
    except KeyError:
        raise ConfigError(f"data.source = {cfg.source!r} is invalid: expected one of {', '.join(SOURCES)}") from None


def available_splits(cfg: DataConfig) -> list[str]:
    """The splits the configured source has under ``cfg.root``."""
    return get_source(cfg).list_splits(cfg)


def load_index(cfg: DataConfig, split: str) -> SplitIndex:
    """The checked index of ``split``, cut to ``cfg.limit`` rows (seeded subset or first rows)."""
    index = get_source(cfg).load_split(cfg, split)
    if cfg.noisy_labels:  # CIFAR-10N / CIFAR-100N: the training split gets a human label set
        index = apply_label_set(index, cfg.noisy_labels, cfg.label_set, cfg.root)
    index = check_index(index)
    return limit_index(index, cfg.limit, subset=cfg.subset, seed=cfg.seed)
