"""``mcpipe train-head``: MetaCleaner + softmax on cached features, the stage's entry point.

``prepare`` loads the stores once (and the kNN graph, cached beside the
store); ``train_head`` trains one configuration into a run folder, so
``mcpipe sweep`` can call it many times on what was loaded once.

Run folder: ``config.toml``, ``checkpoint.pt`` (every epoch, atomic),
``head.pt``, ``metrics.json``, ``scores.csv`` (training images, most suspect
first) and ``confusion.csv`` (test split, when there is one).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcpipe.cleaner import knn
from mcpipe.cleaner.metrics import accuracy, confusion, detection, label_truth
from mcpipe.cleaner.model import Head
from mcpipe.cleaner.noise import noise_from_config
from mcpipe.cleaner.sampler import SubsetSampler
from mcpipe.cleaner.train import alpha_scores, make_optimizer, predict, set_accuracy, train_one_epoch
from mcpipe.config import Config, config_from_dict, to_toml
from mcpipe.devices import resolve_device
from mcpipe.errors import ConfigError, DataError
from mcpipe.loading import load_problem, load_state_checked
from mcpipe.progress import progress_bar
from mcpipe.rundir import save_atomic, start_run_dir, write_confusion, write_json_atomic, write_text_atomic
from mcpipe.store.reader import FeatureStore, open_store, read_features

log = logging.getLogger(__name__)

HEAD_FORMAT = "mcpipe-head"
RUN_SECTIONS = ("noise", "cleaner", "train")
_CHECKPOINT_KEYS = {"head", "optimizer", "scheduler", "epoch", "history", "config"}
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


def prepare(cfg: Config, features_dir: str | Path) -> Prepared:
    """Open ``features_dir/train.h5`` (and ``test.h5`` when present) and put them on the device."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise DataError(f"--features {features_dir} is not a folder of stores (mcpipe extract --out writes one)")
    train = open_store(features_dir / "train.h5", load_features=False)
    test = open_store(features_dir / "test.h5") if (features_dir / "test.h5").exists() else None
    if test is None:
        log.warning("no %s: test accuracy will not be measured", features_dir / "test.h5")
    else:
        _check_pair(train, test)
    device = resolve_device(cfg.train.device, key="train.device")
    # the neighbour search reads the file block by block, before the features are loaded:
    # its float16 copy of the store and the features are never in memory together
    k = cfg.cleaner.knn_k
    start = time.perf_counter()
    found = {k: knn.load_or_build_neighbours(train, k=k)}
    seconds = {"neighbours": time.perf_counter() - start}
    train = dataclasses.replace(train, features=read_features(train))
    to = lambda s: torch.from_numpy(s.features).to(device)  # noqa: E731
    prep = Prepared(features_dir, train, test, device, to(train), to(test) if test is not None else None,
                    neighbours=found)
    prep.seconds = {**seconds, "load": time.perf_counter() - start - seconds["neighbours"]}
    return prep


def _noisy_labels(cfg: Config, prep: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """(given labels for training, known clean labels for the metrics)."""
    store = prep.train
    if cfg.noise.kind == "none":
        return store.labels.copy(), store.clean_labels.copy()
    noisy = noise_from_config(store.labels, store.num_classes, cfg.noise)
    return noisy, store.labels.copy()  # the original labels become the known clean ones


def _graph(cfg: Config, prep: Prepared, labels: np.ndarray):
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


def _new_head(cfg: Config, prep: Prepared) -> Head:
    c = cfg.cleaner
    mean = std = None
    if cfg.train.standardize:
        mean, std = feature_moments(prep.train_x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        head = Head(prep.train.feature_dim, prep.train.num_classes, subset_size=c.subset_size, hidden=c.hidden,
                    weighting=c.weighting, combine=c.combine, mean=mean, std=std)
    return head.to(prep.device)


def _provenance(store: FeatureStore) -> dict:
    keys = ("backbone", "weights", "weights_sha256", "preprocessing", "image_size", "source_fingerprint",
            "config_fingerprint", "dataset")
    return {k: store.attrs.get(k) for k in keys}


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
    return note + source + to_toml(cfg, sections)


def train_head(cfg: Config, prep: Prepared, out: str | Path, *, resume: bool = False, overwrite: bool = False,
               progress: bool = False) -> dict:
    """Train one configuration into ``out``; returns the metrics (also in ``out/metrics.json``)."""
    out = Path(out)
    store = prep.train
    config_text = run_config_text(cfg, store)
    start = time.perf_counter()
    given, clean = _noisy_labels(cfg, prep)
    graph = _graph(cfg, prep, given)
    n = cfg.cleaner.subset_size
    sampler = SubsetSampler(given, subset_size=n, batch_size=cfg.train.batch_size, mining=cfg.cleaner.mining,
                            neighbours=graph.same_label, agreement=knn.agreement(graph, given), seed=cfg.train.seed)
    if sampler.small_classes:
        names = ", ".join(store.classes[c] for c in sampler.small_classes[:10])
        log.warning("%d classes have fewer than N = %d images and are drawn with replacement: %s",
                    len(sampler.small_classes), n, names)
    head = _new_head(cfg, prep)
    run_lock = start_run_dir(out, config_text, _RUN_FILES, resume=resume, overwrite=overwrite)  # inputs are valid
    t = cfg.train
    optimizer, scheduler = make_optimizer(head, t)
    history: list[dict] = []
    first_epoch = 0
    if resume:
        history, first_epoch = _resume(out / "checkpoint.pt", prep.device, head, optimizer, scheduler)
        log.info("resuming %s after epoch %d", out, first_epoch)
    given_t = torch.from_numpy(given).to(prep.device)
    per_epoch = len(sampler) * max(1, t.batch_size // n) * n
    with progress_bar(progress) as bar:
        task = bar.add_task("train-head", total=per_epoch * (t.epochs - first_epoch))
        for epoch in range(first_epoch, t.epochs):
            bar.update(task, description=f"epoch {epoch + 1}/{t.epochs}")
            stats = train_one_epoch(head, prep.train_x, given_t, sampler, epoch, optimizer,
                                    on_batch=lambda k, loss: bar.update(task, advance=k,
                                                                        description=f"epoch {epoch + 1}/{t.epochs} "
                                                                                    f"loss {loss:.3f}"))
            scheduler.step()
            row = {"epoch": epoch + 1, "loss": stats["loss"], "lr": optimizer.param_groups[0]["lr"],
                   "images_per_second": stats["images"] / max(stats["seconds"], 1e-9)}
            if prep.test is not None:
                row["test_accuracy"] = accuracy(predict(head, prep.test_x)[0], prep.test.labels)
            history.append(row)
            save_atomic({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                          "config": config_text}, out / "checkpoint.pt")
            log.info("epoch %d/%d: loss %.4f%s, %.0f img/s", epoch + 1, t.epochs, row["loss"],
                     f", test accuracy {row['test_accuracy']:.4f}" if "test_accuracy" in row else "",
                     row["images_per_second"])
    metrics = _finish(cfg, prep, head, out, given, clean, graph, history)
    metrics["seconds"] = time.perf_counter() - start
    write_json_atomic(metrics, out / "metrics.json")
    run_lock.release()
    return metrics


def _resume(path: Path, device: torch.device, head: Head, optimizer, scheduler) -> tuple[list[dict], int]:
    """Load the checkpoint at ``path`` into ``head``, ``optimizer`` and ``scheduler``; (history, next epoch).

    DataError for a file that is unreadable, not a train-head checkpoint, or of a head
    that does not fit these features (another dimension or class count)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled objects weights_only refuses
        raise DataError(f"--resume: {path} cannot be read: {load_problem(exc)}") from None
    if not isinstance(ckpt, dict) or not _CHECKPOINT_KEYS <= ckpt.keys():
        raise DataError(f"--resume: {path} is not an mcpipe train-head checkpoint "
                        f"(expected the keys {', '.join(sorted(_CHECKPOINT_KEYS))})")
    load_state_checked(head, ckpt["head"], what=f"--resume: {path}",
                       hint="it was trained on other features; resume on the store it started from, or --overwrite")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt["history"], ckpt["epoch"] + 1


def _finish(cfg: Config, prep: Prepared, head: Head, out: Path, given: np.ndarray, clean: np.ndarray, graph,
            history: list[dict]) -> dict:
    store = prep.train
    n = cfg.cleaner.subset_size
    pred, probs = predict(head, prep.train_x)
    scores = {
        "alpha": alpha_scores(head, prep.train_x, given, subset_size=n, repeats=cfg.cleaner.score_repeats,
                              seed=cfg.train.seed),
        "classifier": probs[np.arange(len(given)), given],
        "knn": knn.agreement(graph, given),
    }
    metrics: dict = {"history": history, "train_images": int(len(given)),
                     "noise": {"kind": cfg.noise.kind, "rate": cfg.noise.rate,
                               "realized_rate": float((given != store.labels).mean())},
                     "features": str(prep.features_dir.resolve())}
    if prep.test is not None:
        test_pred = predict(head, prep.test_x)[0]
        metrics["test_accuracy"] = accuracy(test_pred, prep.test.labels)
        write_confusion(confusion(test_pred, prep.test.labels, store.num_classes), list(store.classes),
                        out / "confusion.csv")
        metrics["test_images"] = int(len(prep.test.labels))
        if n > 1:
            metrics["set_accuracy"] = set_accuracy(head, prep.test_x, prep.test.labels, subset_size=n,
                                                   seed=cfg.train.seed)
    # a human check of the given label (Food-101N's verification) counts only for the labels as given
    known, wrong = label_truth(given, clean, store.verified if cfg.noise.kind == "none" else None)
    found = {name: detection(s, known, wrong) for name, s in scores.items()}
    metrics["detection"] = {name: d for name, d in found.items() if d is not None}
    rank = cfg.train.rank_by
    if found[rank] is not None:
        metrics["noise_detection_auroc"] = found[rank]["auroc"]
        metrics["noise_detection_ap"] = found[rank]["average_precision"]
    metrics["ranked_by"] = rank
    _write_scores(out / "scores.csv", store, given, clean, np.where(known, ~wrong, -1), pred, scores, rank)
    save_atomic({"format": HEAD_FORMAT, "version": 1, "state_dict": head.state_dict(), "head": head.config(),
                  "classes": list(store.classes), "feature_dim": store.feature_dim,
                  "provenance": _provenance(store), "config": to_toml(cfg)}, out / "head.pt")
    return metrics


def _write_scores(path: Path, store: FeatureStore, given, clean, correct, pred, scores: dict, rank: str) -> None:
    """One row per training image, most suspect (lowest ``rank`` score) first.

    ``correct``: (M,) 1 given label known right, 0 known wrong, -1 unknown (written as "")."""
    order = np.argsort(scores[rank], kind="stable")
    names = store.classes
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "id", "given_label", "predicted_label", "clean_label", "given_label_correct", "alpha_score",
                "classifier_score", "knn_score"])
    for r, i in enumerate(order, 1):
        w.writerow([r, store.ids[i], names[given[i]], names[pred[i]], names[clean[i]] if clean[i] >= 0 else "",
                    "" if correct[i] < 0 else int(correct[i]), f"{scores['alpha'][i]:.5f}", f"{scores['classifier'][i]:.5f}", f"{scores['knn'][i]:.4f}"])
    write_text_atomic(buf.getvalue(), path)  # a full disk or read-only folder: one line naming the file


def run(cfg: Config, *, features: str | Path, out: str | Path, resume: bool = False, overwrite: bool = False,
        progress: bool = False) -> dict:
    """``mcpipe train-head``: load the stores, train, write the run folder."""
    prep = prepare(cfg, features)
    return train_head(cfg, prep, out, resume=resume, overwrite=overwrite, progress=progress)
