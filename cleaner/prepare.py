"""What every head run on one feature folder shares, loaded once: ``prepare`` opens the stores, puts their
features on the device and (when a run will read it) finds every image's neighbours; ``graph_for`` gives a
run the FAISS kNN graph of its labels, built once per process and cached beside the store.

``mcpipe train-head`` prepares for its one run, ``mcpipe sweep`` once for all its points.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcpipe.cleaner import knn
from mcpipe.config import Config
from mcpipe.devices import resolve_device
from mcpipe.errors import DataError
from mcpipe.store.reader import FeatureStore, open_store, read_features

log = logging.getLogger(__name__)

VAL_SPLITS = ("val", "verified_val")  # stores chosen on, when beside train.h5 (imagefolder/Clothing1M, Food-101N)


@dataclass
class Prepared:
    """What every head run on one feature folder shares, loaded once."""

    features_dir: Path
    train: FeatureStore
    test: FeatureStore | None
    device: torch.device
    train_x: torch.Tensor          # (M, D) on the device, store dtype
    test_x: torch.Tensor | None
    val: FeatureStore | None = None  # val.h5 (or verified_val.h5) beside train.h5: chosen on instead of a hold-out
    val_x: torch.Tensor | None = None
    graphs: dict = field(default_factory=dict)  # (k, labels hash) -> KnnGraph
    neighbours: dict = field(default_factory=dict)  # k -> (neighbours, similarity), label-independent
    seconds: dict = field(default_factory=dict)  # {"neighbours": s, "load": s} spent by prepare


def _check_pair(train: FeatureStore, test: FeatureStore) -> None:
    for what, a, b in (("feature dimension", train.feature_dim, test.feature_dim),
                       ("classes", train.classes, test.classes),
                       ("backbone", train.attrs.get("backbone"), test.attrs.get("backbone")),
                       ("preprocessing", train.attrs.get("preprocessing"), test.attrs.get("preprocessing"))):
        if a != b:
            raise DataError(f"{train.path} and {test.path} differ in {what}: {a!s:.80} vs {b!s:.80}; "
                            "extract both splits with the same config")


def prepare(cfg: Config, features_dir: str | Path, *, graph: bool | None = None) -> Prepared:
    """Open ``features_dir/train.h5`` (and ``test.h5`` when present) and put them on the device; with
    ``graph`` (default: whether ``cfg`` :func:`needs_graph`) find every image's neighbours first."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise DataError(f"--features {features_dir} is not a folder of stores (mcpipe extract --out writes one)")
    train = open_store(features_dir / "train.h5", load_features=False)
    test = open_store(features_dir / "test.h5") if (features_dir / "test.h5").exists() else None
    if test is None:
        log.warning("no %s: test accuracy will not be measured", features_dir / "test.h5")
    else:
        _check_pair(train, test)
    val = next((open_store(features_dir / f"{name}.h5") for name in VAL_SPLITS
                if (features_dir / f"{name}.h5").exists()), None)
    if val is not None:
        _check_pair(train, val)
    device = resolve_device(cfg.train.device, key="train.device")
    # the neighbour search reads the file block by block, before the features are loaded:
    # its float16 copy of the store and the features are never in memory together
    k = cfg.cleaner.knn_k
    start = time.perf_counter()
    found = {k: knn.load_or_build_neighbours(train, k=k)} if (needs_graph(cfg) if graph is None else graph) else {}
    seconds = {"neighbours": time.perf_counter() - start}
    train = dataclasses.replace(train, features=read_features(train))
    to = lambda s: torch.from_numpy(s.features).to(device)  # noqa: E731
    prep = Prepared(features_dir, train, test, device, to(train), to(test) if test is not None else None,
                    val, to(val) if val is not None else None, neighbours=found)
    prep.seconds = {**seconds, "load": time.perf_counter() - start - seconds["neighbours"]}
    return prep


def needs_graph(cfg: Config) -> bool:
    """Whether a run reads the FAISS graph: for ``knn_score`` in scores.csv, knn or agreement mining, or
    ranking by the kNN score. Otherwise it is not built (on a large store, minutes on a CPU)."""
    return cfg.cleaner.knn_score or cfg.cleaner.mining != "random" or cfg.train.rank_by == "knn"


def graph_for(cfg: Config, prep: Prepared, labels: np.ndarray):
    """The kNN graph of the training features with ``labels`` (built once per process, cached beside the
    store), or None when the run does not need one (:func:`needs_graph`)."""
    if not needs_graph(cfg):
        return None
    key = (cfg.cleaner.knn_k, hash(labels.tobytes()))
    if key not in prep.graphs:
        prep.graphs[key] = knn.load_or_build(prep.train, labels, k=cfg.cleaner.knn_k,
                                             known=prep.neighbours.get(cfg.cleaner.knn_k))
    return prep.graphs[key]


def feature_moments(x: torch.Tensor, *, block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of (M, D) ``x``, in float64 blocks (no float32 copy of ``x``)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(total)
    for start in range(0, len(x), block):
        part = x[start:start + block].double()
        total += part.sum(0)
        squares += (part * part).sum(0)
    n = max(len(x), 1)
    mean = total / n
    var = (squares / n - mean * mean).clamp_min(0) * n / max(n - 1, 1)
    return mean.float(), var.sqrt().float().clamp_min(1e-6)


