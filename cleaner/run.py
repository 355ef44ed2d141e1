"""``mcpipe train-head``: MetaCleaner + softmax on cached features, the stage's entry point.

``prepare`` loads the stores once (and the kNN graph, cached beside the
store); ``train_head`` trains one configuration into a run folder, so
``mcpipe sweep`` can call it many times on what was loaded once.

Run folder: ``config.toml``, ``checkpoint.pt`` (every epoch, atomic),
``head.pt``, ``metrics.json``, ``scores.csv`` (training images, most suspect
first) and ``confusion.csv`` (test split, when there is one).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcpipe.atomic import write_json_atomic
from mcpipe.cleaner import checkpoint, knn
from mcpipe.cleaner.auto import Search, linear_head, search, train_cleaner
from mcpipe.cleaner.linear import fit_linear_heads, probabilities
from mcpipe.cleaner.metrics import accuracy
from mcpipe.cleaner.model import Head
from mcpipe.cleaner.outputs import finish
from mcpipe.cleaner.noise import noise_from_config
from mcpipe.cleaner.sampler import OnRows, SubsetSampler
from mcpipe.cleaner.split import holdout
from mcpipe.cleaner.train import make_optimizer, predict, train_one_epoch
from mcpipe.config import Config, config_from_dict, replace, to_toml
from mcpipe.devices import resolve_device
from mcpipe.errors import ConfigError, DataError
from mcpipe.labels import LabelFile, labels_toml, read_label_file
from mcpipe.progress import progress_bar
from mcpipe.records import HeadEpoch, stamped
from mcpipe.rundir import start_run_dir
from mcpipe.stopping import StopRequest, stop_on_signals
from mcpipe.store.reader import FeatureStore, open_store, read_features

log = logging.getLogger(__name__)

RUN_SECTIONS = ("noise", "cleaner", "train")
VAL_SPLITS = ("val", "verified_val")  # stores chosen on, when beside train.h5 (imagefolder/Clothing1M, Food-101N)
_RUN_FILES = ("config.toml", "checkpoint.pt", "head.pt", "metrics.json", "scores.csv", "confusion.csv")


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


def _run_labels(cfg: Config, prep: Prepared) -> RunLabels:
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


def needs_graph(cfg: Config) -> bool:
    """Whether a run reads the FAISS graph: for ``knn_score`` in scores.csv, knn or agreement mining, or
    ranking by the kNN score. Otherwise it is not built (on a large store, minutes on a CPU)."""
    return cfg.cleaner.knn_score or cfg.cleaner.mining != "random" or cfg.train.rank_by == "knn"


def _graph(cfg: Config, prep: Prepared, labels: np.ndarray):
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


def _new_head(cfg: Config, prep: Prepared, mean: torch.Tensor | None, std: torch.Tensor | None) -> Head:
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


def _validation(cfg: Config, prep: Prepared, labels: RunLabels) -> tuple[np.ndarray, Validation | None]:
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
               progress: bool = False, stop: StopRequest | None = None) -> dict:
    """Train into ``out`` (the automatic search, or exactly ``cfg`` with ``train.auto = false``); returns the
    metrics (also in ``out/metrics.json``). ``stop``: a SIGTERM/SIGUSR1 request (``mcpipe.stopping``): a fixed
    configuration stops after the epoch's checkpoint, the search and the refit (no checkpoints of their own)
    at once; each raises ``Preempted``."""
    out = Path(out)
    stop = stop if stop is not None else StopRequest()
    store = prep.train
    config_text = run_config_text(cfg, store)
    start = time.perf_counter()
    labels = _run_labels(cfg, prep)
    given = labels.given
    graph = _graph(cfg, prep, given)
    fit_rows, val = _validation(cfg, prep, labels)
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
        metrics["seconds"] = time.perf_counter() - start
        write_json_atomic(stamped(metrics), out / "metrics.json")
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
           val: Validation | None, mean, std, *, resume: bool, bar, stop: StopRequest) -> tuple[Head, list[dict]]:
    """Exactly ``cfg`` (``train.auto = false``): train the fit rows, a checkpoint every epoch."""
    head = _new_head(cfg, prep, mean, std)
    t = cfg.train
    optimizer, scheduler = make_optimizer(head, t)
    history: list[dict] = []
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
                        **_scored(prep, val, lambda x: predict(head, x)[0])).to_dict()
        history.append(row)
        checkpoint.save_epoch(out / "checkpoint.pt", head, optimizer, scheduler, epoch=epoch, history=history,
                              config=config_text)
        log.info("epoch %d/%d: loss %.4f%s%s, %.0f img/s", epoch + 1, t.epochs, row["loss"],
                 f", validation accuracy {row['val_accuracy']:.4f}" if "val_accuracy" in row else "",
                 f", test accuracy {row['test_accuracy']:.4f}" if "test_accuracy" in row else "",
                 row["images_per_second"])
        if stop.requested and epoch + 1 < t.epochs:
            raise stop.preempted(f"checkpoint after epoch {epoch + 1} of {t.epochs} in {out / 'checkpoint.pt'}")
    return head, history


def _auto(cfg: Config, prep: Prepared, out: Path, config_text: str, given: np.ndarray, fit_rows: np.ndarray,
          val: Validation, graph, mean, std, *, resume: bool, bar, stop: StopRequest) -> tuple[Head, list[dict], Search]:
    """``train.auto``: the search (or its checkpoint), then the chosen configuration refitted on all rows."""
    found = checkpoint.load_search(out / "checkpoint.pt", prep.device, lambda n: _new_head(
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
                           std=std.to(prep.device), new_head=lambda c: _new_head(c, prep, mean, std),
                           cleaner_sampler=lambda c: _sampler(c, given, fit_rows, graph), val_clean=val.clean)
        bar.update(task, total=1, completed=1)
        checkpoint.save_search(out / "checkpoint.pt", found, config=config_text)
    choice = found.choice
    log.info("chose %s: validation score %.4f (accuracy against the given labels %.4f) at epoch %d, of %d "
             "candidates in %.1f s", choice.name, choice.val_score, choice.val_accuracy, choice.best_epoch,
             len(found.candidates), found.seconds)
    if not cfg.train.refit or val.rows is None:  # a val.h5 store is not training data: nothing to refit on
        history = [HeadEpoch(e + 1, val_accuracy=a).to_dict() for e, a in enumerate(choice.val_curve[:choice.best_epoch])]
        return found.head, history, found
    with stop.at_once(f"the search is saved in {out / 'checkpoint.pt'}, the refit is redone on resume"):
        return _refit(cfg, prep, found, fit_rows, val, graph, mean, std)


def _refit(cfg: Config, prep: Prepared, found: Search, fit_rows: np.ndarray, val: Validation, graph, mean,
           std) -> tuple[Head, list[dict], Search]:
    """The search's choice trained again on the fit and validation rows, for as many epochs as it chose."""
    choice = found.choice
    point = replace(replace(cfg, "cleaner", subset_size=choice.subset_size), "train",
                    weight_decay=choice.weight_decay)
    everything = np.union1d(fit_rows, val.rows).astype(np.int64)  # every row but those a label file drops
    history: list[dict] = []
    if choice.subset_size == 1:
        m, s = found.head.mean, found.head.std

        def on_linear_epoch(epoch, weight, bias, loss):
            history.append(HeadEpoch(epoch + 1, float(loss[0]), **_scored(
                prep, None, lambda x: probabilities(x, weight, bias, m, s)[:, 0].argmax(1))).to_dict())

        fits = fit_linear_heads(prep.train_x, everything, found.labels[everything][None],
                                found.weights[everything][None],
                                np.array([choice.weight_decay]), num_classes=prep.train.num_classes, mean=m, std=s,
                                train=cfg.train, epochs=choice.best_epoch, seed=cfg.train.seed,
                                on_epoch=on_linear_epoch)
        return linear_head(cfg, fits.weight[0], fits.bias[0], m, s), history, found
    head = _new_head(point, prep, mean, std)
    sampler = _sampler(point, found.labels, everything, graph)

    def on_epoch(epoch, h, loss):
        history.append(HeadEpoch(epoch + 1, loss, **_scored(prep, None, lambda x: predict(h, x)[0])).to_dict())

    head, _, _ = train_cleaner(point, head, prep.train_x, torch.from_numpy(found.labels).to(prep.device), sampler,
                               epochs=choice.best_epoch, val=None, on_epoch=on_epoch)
    return head, history, found


def run(cfg: Config, *, features: str | Path, out: str | Path, resume: bool = False, overwrite: bool = False,
        progress: bool = False) -> dict:
    """``mcpipe train-head``: load the stores, train, write the run folder; SIGTERM/SIGUSR1 stop it resumably."""
    prep = prepare(cfg, features)
    with stop_on_signals() as stop:
        return train_head(cfg, prep, out, resume=resume, overwrite=overwrite, progress=progress, stop=stop)
