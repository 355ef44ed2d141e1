"""``mcpipe finetune``: backbone + MetaCleaner + classifier trained end to end on images.

Phases, each optional (``[finetune]``): ``cleaner`` (K x N subsets through the
cleaner, the first ``freeze_epochs`` with the backbone frozen), ``unload``
(cleaner dropped, plain softmax on the same noisy split) and ``clean``
(plain softmax on ``clean_split``). Each phase starts its own SGD (momentum,
one learning rate for the backbone, one for the head) and per-step schedule
(``mcpipe.finetune.schedule``: cosine or step, after a linear warm-up).
After every epoch, with the cleaner removed: top-1 on the validation set
against its given labels (and against its clean labels where known),
top-1/top-5 on ``test_split``; then ``metrics.json`` and ``checkpoint.pt``
(atomic). ``--resume`` continues from the last epoch to the numbers an
uninterrupted run gives on the same device.

Model selection is on validation only, never on the test split: the validation
set is ``val_split`` when the data has it, else a seeded stratified hold-out of
``val_fraction`` of ``train_split`` (``stratified_holdout``; those images are
not trained on). ``best_epoch`` is the epoch of the highest validation top-1
and ``test_accuracy_at_best_epoch`` the test top-1 there; the test split is
only reported. With ``--head``, the network as the head leaves it is evaluated
before any step (``start``, epoch 0) and is a candidate too. The exported
model (``model.pt`` + ``model.json``, see ``mcpipe.finetune.export``) is the
best epoch's, written when that epoch is reached (``finetune.export = "best"``,
with a validation set), or the last epoch's; ``test_accuracy`` is its test
top-1 and ``exported_epoch`` its epoch.

Under ``torchrun`` every process trains a DistributedDataParallel replica on
its own batches (disjoint subsets) and evaluates a shard of the validation and
test sets; only rank 0 writes.

Run folder: ``config.toml``, ``checkpoint.pt``, ``metrics.json``, ``model.pt``, ``model.json``,
``confusion.csv`` (test split, the exported model).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mcpipe.cleaner.model import Head
from mcpipe.cleaner.noise import noise_from_config
from mcpipe.cleaner.head_file import load_head
from mcpipe.cleaner.sampler import SubsetSampler
from mcpipe.config import Config, to_toml
from mcpipe.devices import resolve_device
from mcpipe.errors import ConfigError, DataError
from mcpipe.labels import labels_toml, read_label_file
from mcpipe.extract.backbones import build_backbone
from mcpipe.distributed import DistInfo, barrier, init, shutdown
from mcpipe.extract.preprocess import preprocess_for, train_transform
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.extract.sources.registry import available_splits, load_index
from mcpipe.cleaner.split import stratified_holdout
from mcpipe.finetune.data import ShuffledBatches, SubsetBatches, TrainImages, collate
from mcpipe.finetune.export import export_model
from mcpipe.finetune.model import Net
from mcpipe.finetune.schedule import phase_scheduler
from mcpipe.finetune.train import evaluate, train_epoch
from mcpipe.loading import load_problem, load_state_checked
from mcpipe.progress import progress_bar
from mcpipe.rundir import check_run_dir, save_atomic, start_run_dir, write_confusion, write_json_atomic

log = logging.getLogger(__name__)

RUN_FILES = ("config.toml", "checkpoint.pt", "metrics.json", "model.pt", "model.json", "confusion.csv")
SECTIONS = ("data", "extract", "noise", "cleaner", "finetune")
CHECKPOINT_FORMAT = "mcpipe-finetune-checkpoint"
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "phase", "history", "seconds", "replaced", "config"}


@dataclass(frozen=True)
class Phase:
    name: str  # cleaner | unload | clean
    epochs: int
    split: str
    cleaner: bool


def plan(cfg: Config) -> list[Phase]:
    f = cfg.finetune
    phases = [Phase("cleaner", f.epochs, f.train_split, True), Phase("unload", f.unload_epochs, f.train_split, False),
              Phase("clean", f.clean_epochs, f.clean_split, False)]
    return [p for p in phases if p.epochs > 0]


def run(cfg: Config, *, out: str | Path, head: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, progress: bool = False) -> dict:
    """Train, evaluate and export into ``out``; returns the metrics (also in ``out/metrics.json``)."""
    info = DistInfo.from_env()
    device = resolve_device(cfg.finetune.device, key="finetune.device", local_rank=info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init(info, device)
    try:
        return _run(cfg, info, device, Path(out), None if head is None else Path(head), resume, overwrite, progress)
    finally:
        shutdown(info)


def _run(cfg: Config, info: DistInfo, device: torch.device, out: Path, head_run: Path | None, resume: bool,
         overwrite: bool, progress: bool) -> dict:
    f = cfg.finetune
    config_text = labels_toml(cfg.labels.file) + to_toml(cfg, SECTIONS)
    check_run_dir(out, config_text, RUN_FILES, resume=resume, overwrite=overwrite)  # before any slow work
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

    run_lock = start_run_dir(out, config_text, RUN_FILES, resume=resume, overwrite=overwrite) if info.is_main else None
    barrier(info)
    ckpt = _read_checkpoint(out, device, config_text) if resume else None
    if ckpt is not None:
        load_state_checked(net, ckpt["model"], what=f"--resume: {out / 'checkpoint.pt'}",
                           hint="the data set's classes or the backbone changed since; --overwrite to start again")
    history: list[dict] = ckpt["history"] if ckpt else []
    done = ckpt["epoch"] if ckpt else 0
    start = time.perf_counter()
    seconds_before = ckpt["seconds"] if ckpt else 0.0
    given_t = torch.from_numpy(given).to(device)
    clean_t = torch.from_numpy(clean.labels).to(device) if clean is not None else None
    total_epochs = sum(p.epochs for p in plan(cfg))
    replaced = ckpt["replaced"] if ckpt else 0

    def evaluated() -> tuple[dict, np.ndarray | None]:
        """Top-1 on validation (given and clean labels) and test, cleaner removed; the test confusion counts."""
        scores, confusion = {}, None
        if val is not None:  # the same eval transform, sharding and all-reduce as the test split
            scores.update(evaluate(net, val, pre, device=device, amp=amp, batch_size=f.batch_size,
                                   workers=f.workers, info=info, name="val", clean=True)[0])
        if test is not None:
            more, confusion = evaluate(net, test, pre, device=device, amp=amp, batch_size=f.batch_size,
                                       workers=f.workers, info=info)
            scores.update(more)
        return scores, confusion

    def export(metrics: dict, confusion: np.ndarray | None) -> None:
        export_model(out, net, backbone=cfg.extract.backbone, image_size=cfg.extract.image_size,
                     classes=train.classes, pre=pre, provenance=backbone.provenance,
                     metrics={k: metrics[k] for k in ("test_accuracy", "test_top5") if k in metrics})
        if confusion is not None:
            write_confusion(confusion, list(test.classes), out / "confusion.csv")

    keep_best = f.export == "best" and val is not None
    begin = ckpt.get("start") if ckpt else None
    if ckpt is None and head_run is not None and val is not None:
        # the network as the head left it is a candidate too: fine-tuning must beat it on validation
        scores, confusion = evaluated()
        begin = {"epoch": 0, "phase": "start", **scores}
        if info.is_main:
            log.info("start (the head on the pretrained backbone): val top-1 %.4f%s", begin["val_top1"],
                     f", test top-1 {begin['test_top1']:.4f}" if "test_top1" in begin else "")
            if keep_best:
                export(_metrics(cfg, history, train, given, val, 0.0, 0, begin, labels=labels_record), confusion)
        barrier(info)
    epoch = 0
    for phase in plan(cfg):
        index, labels_t, labels = (clean, clean_t, clean.labels) if phase.name == "clean" else (train, given_t, given)
        if epoch + phase.epochs <= done:
            epoch += phase.epochs
            continue
        dataset = TrainImages(index, labels, train_transform(pre, crop_scale=f.crop_scale), seed=f.seed,
                              min_size=pre.resize)
        subsets = (SubsetSampler(labels, subset_size=head.cleaner.subset_size, batch_size=f.batch_size, seed=f.seed)
                   if phase.cleaner else None)

        def epoch_batches(e: int) -> SubsetBatches | ShuffledBatches:
            return (SubsetBatches(subsets, e, rank=info.rank, world=info.world_size) if phase.cleaner else
                    ShuffledBatches(len(index), f.batch_size, e, seed=f.seed, rank=info.rank, world=info.world_size))

        optimizer, scheduler = _optimizer(net, cfg, phase.epochs, len(epoch_batches(epoch)))
        if ckpt is not None and ckpt["phase"] == phase.name and done > epoch:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        model, wrapped_for = net, None
        for e in range(phase.epochs):
            if epoch < done:
                epoch += 1
                continue
            # random layers (EfficientNet's drop-connect, dropout) draw from torch's generator: seed it per
            # (seed, epoch, rank) so a run, and a run resumed at any epoch, gives the same numbers
            torch.manual_seed(_epoch_seed(f.seed, epoch, info.rank))
            trainable = f.backbone_lr > 0 and not (phase.name == "cleaner" and e < f.freeze_epochs)
            net.set_backbone_trainable(trainable)
            if info.enabled and wrapped_for != trainable:  # DDP holds the parameters that need gradients
                model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                find_unused_parameters=not phase.cleaner,
                                                broadcast_buffers=not f.freeze_bn)  # fixed statistics: nothing to sync
                wrapped_for = trainable
            batches = epoch_batches(epoch)
            if len(batches) == 0:
                raise DataError(f"split {index.split!r} has {len(index)} images: not one batch of "
                                f"{f.batch_size} per process; lower finetune.batch_size")
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=f.workers, collate_fn=collate,
                                pin_memory=device.type == "cuda")
            with progress_bar(progress and info.is_main) as bar:
                task = bar.add_task(f"{phase.name} {epoch + 1}/{total_epochs}", total=len(batches) * f.batch_size)
                stats = train_epoch(model, net, loader, labels_t, cleaner=phase.cleaner, optimizer=optimizer,
                                    scheduler=scheduler, device=device, amp=amp, info=info,
                                    on_batch=lambda k, msg: bar.update(task, advance=k, description=(
                                        f"{phase.name} {epoch + 1}/{total_epochs} {msg}")))
            replaced += stats["replaced"]
            row = {"epoch": epoch + 1, "phase": phase.name, "loss": stats["loss"],
                   "lr": optimizer.param_groups[-1]["lr"], "backbone_lr": optimizer.param_groups[0]["lr"],
                   "backbone_trained": trainable, "images_per_second": stats["images_per_second"]}
            scores, confusion = evaluated()
            row.update(scores)
            history.append(row)
            epoch += 1
            seconds = seconds_before + time.perf_counter() - start
            row["seconds"] = seconds  # wall time of the run so far, evaluations included
            if info.is_main:
                metrics = _metrics(cfg, history, train, given, val, seconds, replaced, begin, labels=labels_record)
                if keep_best and metrics["best_epoch"] == epoch:  # before the checkpoint: a resume re-exports
                    export(metrics, confusion)
                elif not keep_best and confusion is not None:
                    write_confusion(confusion, list(test.classes), out / "confusion.csv")
                save_atomic({"format": CHECKPOINT_FORMAT, "model": net.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "epoch": epoch, "phase": phase.name, "history": history, "seconds": seconds,
                             "replaced": replaced, "config": config_text, "start": begin}, out / "checkpoint.pt")
                write_json_atomic(metrics, out / "metrics.json")
                log.info("epoch %d/%d (%s): loss %.4f%s%s, %.1f img/s", epoch, total_epochs, phase.name,
                         row["loss"], f", val top-1 {row['val_top1']:.4f}" if "val_top1" in row else "",
                         f", test top-1 {row['test_top1']:.4f}" if "test_top1" in row else "",
                         row["images_per_second"])
            barrier(info)
    metrics = _metrics(cfg, history, train, given, val, seconds_before + time.perf_counter() - start, replaced,
                       begin, labels=labels_record)
    if info.is_main:
        if not keep_best:  # (the best epoch's model was written when it was reached; confusion.csv every epoch)
            export(metrics, None)
        write_json_atomic(metrics, out / "metrics.json")
        run_lock.release()
    barrier(info)
    return metrics


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


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A torch seed for one (seed, epoch, rank), independent of how the run got there."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


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


def _optimizer(net: Net, cfg: Config, epochs: int,
               steps_per_epoch: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """A phase's SGD (backbone and head groups) and its per-step schedule (``mcpipe.finetune.schedule``)."""
    f = cfg.finetune
    groups = [{"params": list(net.backbone.parameters()), "lr": f.backbone_lr},
              {"params": list(net.head.parameters()), "lr": f.lr}]
    optimizer = torch.optim.SGD(groups, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay, fused=True)
    return optimizer, phase_scheduler(optimizer, schedule=f.lr_schedule, steps_per_epoch=steps_per_epoch,
                                      epochs=epochs, warmup_epochs=f.warmup_epochs, lr_step=f.lr_step,
                                      lr_gamma=f.lr_gamma)


def _read_checkpoint(out: Path, device: torch.device, config_text: str) -> dict:
    path = out / "checkpoint.pt"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise DataError(f"--resume: {path} cannot be read: {load_problem(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or not CHECKPOINT_KEYS <= ckpt.keys():
        raise DataError(f"--resume: {path} is not an mcpipe finetune checkpoint")
    if ckpt["config"] != config_text:
        raise ConfigError(f"--resume: the config differs from the one {out} was started with")
    return ckpt


def _metrics(cfg: Config, history: list[dict], train: SplitIndex, given: np.ndarray, val: SplitIndex | None,
             seconds: float, replaced: int, begin: dict | None = None, *, labels: dict | None = None) -> dict:
    """``metrics.json``: the best epoch is chosen on validation top-1 (given labels; ties: the earlier epoch),
    never on the test split; with ``--head``, epoch 0 (``start``: the head on the pretrained backbone, before
    any training) is a candidate too. The exported model is the best epoch's (``finetune.export = "best"``,
    with a validation set) or the last epoch's; ``test_accuracy`` / ``test_top5`` are the exported model's."""
    m: dict = {"history": history, "seconds": seconds, "train_images": len(train), "images_replaced": replaced,
               "phases": [{"name": p.name, "epochs": p.epochs, "split": p.split} for p in plan(cfg)],
               "noise": {"kind": cfg.noise.kind, "rate": cfg.noise.rate,
                         "realized_rate": float((given != train.labels).mean())},
               "val_images": 0 if val is None else len(val),
               "val_from": None if val is None else val.split, "chosen_on": "none" if val is None else "val"}
    if labels is not None:  # the label file's record
        m["labels"] = labels
    if begin is not None:
        m["start"] = begin
    rows = ([begin] if begin is not None else []) + history
    validated = [h for h in rows if "val_top1" in h]
    best = None
    if validated:
        best = max(validated, key=lambda h: h["val_top1"])  # max keeps the first of equals: the earlier epoch
        m["best_epoch"], m["best_val_accuracy"] = best["epoch"], best["val_top1"]
        if "val_clean_top1" in best:
            m["val_clean_accuracy_at_best_epoch"] = best["val_clean_top1"]
        if "test_top1" in best:
            m["test_accuracy_at_best_epoch"] = best["test_top1"]
    exported = best if cfg.finetune.export == "best" and best is not None else (history[-1] if history else None)
    if exported is not None:
        m["exported_epoch"] = exported["epoch"]
        if "test_top1" in exported:
            m["test_accuracy"] = exported["test_top1"]
            if "test_top5" in exported:
                m["test_top5"] = exported["test_top5"]
    tested = [h for h in history if "test_top1" in h]
    if tested:
        m["test_accuracy_last_epoch"] = tested[-1]["test_top1"]
    return m
