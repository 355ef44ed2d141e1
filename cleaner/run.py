"""``mcpipe train-head``: MetaCleaner + softmax on cached features, the stage's entry point.

``mcpipe.cleaner.prepare`` loads the stores once (and the kNN graph, cached
beside the store); ``train_head`` trains one configuration into a run folder
(its labels and validation split from ``mcpipe.cleaner.inputs``, its files
from ``mcpipe.cleaner.outputs``), so ``mcpipe sweep`` can call it many times
on what was loaded once.

Run folder: ``config.toml``, ``checkpoint.pt`` (every epoch, atomic),
``head.pt``, ``metrics.json``, ``scores.csv`` (training images, most suspect
first) and ``confusion.csv`` (test split, when there is one).
"""

from __future__ import annotations

import logging
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from mcpipe.cleaner import checkpoint, knn
from mcpipe.cleaner.auto import Search, linear_head, search, train_cleaner
from mcpipe.cleaner.inputs import Validation, run_labels, validation_split
from mcpipe.cleaner.linear import fit_linear_heads, probabilities
from mcpipe.cleaner.metrics import accuracy
from mcpipe.cleaner.model import Head
from mcpipe.cleaner.outputs import finish
from mcpipe.cleaner.prepare import Prepared, feature_moments, graph_for, prepare
from mcpipe.cleaner.sampler import OnRows, SubsetSampler
from mcpipe.cleaner.train import make_optimizer, predict, train_one_epoch
from mcpipe.config import Config, config_from_dict, replace, to_toml
from mcpipe.errors import ConfigError
from mcpipe.labels import labels_toml
from mcpipe.progress import progress_bar
from mcpipe.records import HeadEpoch, HeadMetrics, write_metrics
from mcpipe.rundir import start_run_dir
from mcpipe.stopping import StopRequest, stop_on_signals
from mcpipe.store.reader import FeatureStore

log = logging.getLogger(__name__)

RUN_SECTIONS = ("noise", "cleaner", "train")
_RUN_FILES = ("config.toml", "checkpoint.pt", "head.pt", "metrics.json", "scores.csv", "confusion.csv")


def new_head(cfg: Config, prep: Prepared, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> Head:
    """An untrained head for ``prep``'s features (seeded by ``train.seed``), standardising with ``mean``/``std``."""
    c = cfg.cleaner
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        head = Head(prep.train.feature_dim, prep.train.num_classes, subset_size=c.subset_size, hidden=c.hidden,
                    weighting=c.weighting, combine=c.combine, mean=mean, std=std)
    return head.to(prep.device)


def run_config_text(cfg: Config, store: FeatureStore, sections: tuple[str, ...] = ("store", *RUN_SECTIONS)) -> str:
    """A head run's ``config.toml``: ``[data]``/``[extract]`` as the feature store recorded them, then ``sections``.

    train-head reads features, not images, so the data and extract keys of its
    own config play no part; the store's record says what made the features.
    """
    try:
        recorded = tomllib.loads(str(store.attrs.get("config_toml") or ""))
        source = to_toml(config_from_dict({k: recorded[k] for k in ("data", "extract") if k in recorded}),
                         tuple(k for k in ("data", "extract") if k in recorded))
    except (tomllib.TOMLDecodeError, ConfigError):
        source = ""
    note = ("# [data] and [extract]: as recorded by the feature store when it was extracted\n" if source else
            "# the feature store recorded no [data]/[extract] config\n")
    return note + source + labels_toml(cfg.labels.file) + to_toml(cfg, sections)


def _sampler(cfg: Config, given: np.ndarray, rows: np.ndarray, graph) -> OnRows:
    """K x N subsets of the given labels, drawn among ``rows`` (indices into the store)."""
    neighbours = agreement = None
    if graph is not None:  # (random mining reads neither)
        local = np.full(len(given), -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        nb = graph.same_label
        neighbours = np.where(nb >= 0, local[np.maximum(nb, 0)], -1)[rows]
        agreement = knn.agreement(graph, given)[rows]
    sampler = SubsetSampler(given[rows], subset_size=cfg.cleaner.subset_size, batch_size=cfg.train.batch_size,
                            mining=cfg.cleaner.mining, neighbours=neighbours, agreement=agreement,
                            seed=cfg.train.seed)
    return OnRows(sampler, rows)


def train_head(cfg: Config, prep: Prepared, out: str | Path, *, resume: bool = False, overwrite: bool = False,
               progress: bool = False, stop: StopRequest | None = None) -> HeadMetrics:
    """Train into ``out`` (the automatic search, or exactly ``cfg`` with ``train.auto = false``); returns the
    metrics (also in ``out/metrics.json``). ``stop``: a SIGTERM/SIGUSR1 request (``mcpipe.stopping``): a fixed
    configuration stops after the epoch's checkpoint, the search and the refit (no checkpoints of their own)
    at once; each raises ``Preempted``."""
    out = Path(out)
    stop = stop if stop is not None else StopRequest()
    store = prep.train
    config_text = run_config_text(cfg, store)
    start = time.perf_counter()
    labels = run_labels(cfg, prep)
    given = labels.given
    graph = graph_for(cfg, prep, given)
    fit_rows, val = validation_split(cfg, prep, labels)
    if cfg.train.auto and val is None:
        raise ConfigError("train.auto = true chooses on a validation split, and there is none: set "
                          "train.val_fraction > 0, put a val.h5 beside train.h5, or --set train.auto=false")
    if not cfg.train.auto:
        sampler = _sampler(cfg, given, fit_rows, graph)
        if sampler.small_classes:
            names = ", ".join(store.classes[c] for c in sampler.small_classes[:10])
            log.warning("%d classes have fewer than N = %d images and are drawn with replacement: %s",
                        len(sampler.small_classes), cfg.cleaner.subset_size, names)
    mean, std = feature_moments(prep.train_x) if cfg.train.standardize else (None, None)
    # inputs are valid: lock the run folder, released however this ends
    with start_run_dir(out, config_text, _RUN_FILES, resume=resume, overwrite=overwrite), progress_bar(progress) as bar:
        if cfg.train.auto:
            head, history, found = _auto(cfg, prep, out, config_text, given, fit_rows, val, graph, mean, std,
                                         resume=resume, bar=bar, stop=stop)
        else:
            head, history = _fixed(cfg, prep, out, config_text, given, sampler, val, mean, std, resume=resume,
                                   bar=bar, stop=stop)
            found = None
        metrics = finish(cfg, prep, head, out, labels, graph, history, fit_rows, val, found)
        metrics.seconds = time.perf_counter() - start
        write_metrics(metrics, out / "metrics.json")
    return metrics


def _scored(prep: Prepared, val: Validation | None, predictions) -> dict:
    """Validation and test accuracy of a model given as ``predictions``: (M, D) features -> (M,) classes."""
    row = {}
    if val is not None:
        row["val_accuracy"] = accuracy(predictions(val.x), val.given)
    if prep.test is not None:
        row["test_accuracy"] = accuracy(predictions(prep.test_x), prep.test.labels)
    return row


def _fixed(cfg: Config, prep: Prepared, out: Path, config_text: str, given: np.ndarray, sampler: OnRows,
           val: Validation | None, mean, std, *, resume: bool, bar, stop: StopRequest) -> tuple[Head, list[HeadEpoch]]:
    """Exactly ``cfg`` (``train.auto = false``): train the fit rows, a checkpoint every epoch."""
    head = new_head(cfg, prep, mean, std)
    t = cfg.train
    optimizer, scheduler = make_optimizer(head, t)
    history: list[HeadEpoch] = []
    first_epoch = 0
    if resume:
        history, first_epoch = checkpoint.load_epoch(out / "checkpoint.pt", prep.device, head, optimizer, scheduler)
        log.info("resuming %s after epoch %d", out, first_epoch)
    given_t = torch.from_numpy(given).to(prep.device)
    n = cfg.cleaner.subset_size
    per_epoch = len(sampler) * max(1, t.batch_size // n) * n
    task = bar.add_task("train-head", total=per_epoch * (t.epochs - first_epoch))
    for epoch in range(first_epoch, t.epochs):
        label = f"epoch {epoch + 1}/{t.epochs}"
        bar.update(task, description=label)
        stats = train_one_epoch(head, prep.train_x, given_t, sampler, epoch, optimizer,
                                on_batch=lambda k, loss: bar.update(task, advance=k,
                                                                    description=f"{label} loss {loss:.3f}"))
        scheduler.step()
        row = HeadEpoch(epoch + 1, stats["loss"], optimizer.param_groups[0]["lr"],
                        stats["images"] / max(stats["seconds"], 1e-9),
                        **_scored(prep, val, lambda x: predict(head, x)[0]))
        history.append(row)
        checkpoint.save_epoch(out / "checkpoint.pt", head, optimizer, scheduler, epoch=epoch, history=history,
                              config=config_text)
        log.info("epoch %d/%d: loss %.4f%s%s, %.0f img/s", epoch + 1, t.epochs, row.loss,
                 "" if row.val_accuracy is None else f", validation accuracy {row.val_accuracy:.4f}",
                 "" if row.test_accuracy is None else f", test accuracy {row.test_accuracy:.4f}",
                 row.images_per_second)
        if stop.requested and epoch + 1 < t.epochs:
            raise stop.preempted(f"checkpoint after epoch {epoch + 1} of {t.epochs} in {out / 'checkpoint.pt'}")
    return head, history


def _auto(cfg: Config, prep: Prepared, out: Path, config_text: str, given: np.ndarray, fit_rows: np.ndarray,
          val: Validation, graph, mean, std, *, resume: bool, bar,
          stop: StopRequest) -> tuple[Head, list[HeadEpoch], Search]:
    """``train.auto``: the search (or its checkpoint), then the chosen configuration refitted on all rows."""
    found = checkpoint.load_search(out / "checkpoint.pt", prep.device, lambda n: new_head(
        replace(cfg, "cleaner", subset_size=n), prep, mean, std)) if resume else None
    if found is not None:
        log.info("resuming %s after its search", out)
    else:
        checkpoint.save_search(out / "checkpoint.pt", None, config=config_text)  # --resume works from here on
        task = bar.add_task("train-head: choosing on validation", total=None)
        if mean is None:
            mean, std = torch.zeros(prep.train.feature_dim), torch.ones(prep.train.feature_dim)
        with stop.at_once("the search on validation is redone on resume (it has no checkpoint of its own)"):
            found = search(cfg, prep.train_x, given, fit_rows, (val.x, val.given),
                           num_classes=prep.train.num_classes, val_rows=val.rows, mean=mean.to(prep.device),
                           std=std.to(prep.device), new_head=lambda c: new_head(c, prep, mean, std),
                           cleaner_sampler=lambda c: _sampler(c, given, fit_rows, graph), val_clean=val.clean)
        bar.update(task, total=1, completed=1)
        checkpoint.save_search(out / "checkpoint.pt", found, config=config_text)
    choice = found.choice
    log.info("chose %s: validation score %.4f (accuracy against the given labels %.4f) at epoch %d, of %d "
             "candidates in %.1f s", choice.name, choice.val_score, choice.val_accuracy, choice.best_epoch,
             len(found.candidates), found.seconds)
    if not cfg.train.refit or val.rows is None:  # a val.h5 store is not training data: nothing to refit on
        history = [HeadEpoch(e + 1, val_accuracy=a) for e, a in enumerate(choice.val_curve[:choice.best_epoch])]
        return found.head, history, found
    with stop.at_once(f"the search is saved in {out / 'checkpoint.pt'}, the refit is redone on resume"):
        return _refit(cfg, prep, found, fit_rows, val, graph, mean, std)


def _refit(cfg: Config, prep: Prepared, found: Search, fit_rows: np.ndarray, val: Validation, graph, mean,
           std) -> tuple[Head, list[HeadEpoch], Search]:
    """The search's choice trained again on the fit and validation rows, for as many epochs as it chose."""
    choice = found.choice
    point = replace(replace(cfg, "cleaner", subset_size=choice.subset_size), "train",
                    weight_decay=choice.weight_decay)
    everything = np.union1d(fit_rows, val.rows).astype(np.int64)  # every row but those a label file drops
    history: list[HeadEpoch] = []
    if choice.subset_size == 1:
        m, s = found.head.mean, found.head.std

        def on_linear_epoch(epoch, weight, bias, loss):
            history.append(HeadEpoch(epoch + 1, float(loss[0]), **_scored(
                prep, None, lambda x: probabilities(x, weight, bias, m, s)[:, 0].argmax(1))))

        fits = fit_linear_heads(prep.train_x, everything, found.labels[everything][None],
                                found.weights[everything][None],
                                np.array([choice.weight_decay]), num_classes=prep.train.num_classes, mean=m, std=s,
                                train=cfg.train, epochs=choice.best_epoch, seed=cfg.train.seed,
                                on_epoch=on_linear_epoch)
        return linear_head(cfg, fits.weight[0], fits.bias[0], m, s), history, found
    head = new_head(point, prep, mean, std)
    sampler = _sampler(point, found.labels, everything, graph)

    def on_epoch(epoch, h, loss):
        history.append(HeadEpoch(epoch + 1, loss, **_scored(prep, None, lambda x: predict(h, x)[0])))

    head, _, _ = train_cleaner(point, head, prep.train_x, torch.from_numpy(found.labels).to(prep.device), sampler,
                               epochs=choice.best_epoch, val=None, on_epoch=on_epoch)
    return head, history, found


def run(cfg: Config, *, features: str | Path, out: str | Path, resume: bool = False, overwrite: bool = False,
        progress: bool = False) -> HeadMetrics:
    """``mcpipe train-head``: load the stores, train, write the run folder; SIGTERM/SIGUSR1 stop it resumably."""
    prep = prepare(cfg, features)
    with stop_on_signals() as stop:
        return train_head(cfg, prep, out, resume=resume, overwrite=overwrite, progress=progress, stop=stop)
