"""``mcpipe finetune``: backbone + MetaCleaner + classifier trained end to end on images.

Phases, each optional (``[finetune]``): ``cleaner`` (K x N subsets through the
cleaner, the first ``freeze_epochs`` with the backbone frozen), ``unload``
(cleaner dropped, plain softmax on the same noisy split) and ``clean``
(plain softmax on ``clean_split``). Each phase starts its own SGD (momentum,
one learning rate for the backbone, one for the head) and per-step schedule
(``mcpipe.finetune.schedule``: cosine or step, after a linear warm-up).
After every epoch, with the cleaner removed: top-1 on the validation set
against its given labels (and against its clean labels where known),
top-1/top-5 on ``test_split``; then ``checkpoint.pt`` (atomic, see
``mcpipe.finetune.checkpoint``) and ``metrics.json``. Inside an epoch a
checkpoint is also written every ``checkpoint_minutes`` (after a step: it holds
the sampler's position). ``--resume`` continues from the last checkpoint, inside
an epoch too, to the numbers an uninterrupted run gives on the same device.

SIGTERM or SIGUSR1 (``mcpipe.stopping``): the step in flight finishes, a
checkpoint is written and the run stops with ``Preempted`` (exit 75, one line
saying how to resume). A signal during start-up takes effect after the first
step; one during an epoch's evaluation or export after that epoch's checkpoint
(the evaluation is not cut short: under torchrun its shards meet in an
all-reduce that a rank leaving early would leave waiting). A second signal a
second or more later stops at once (``KeyboardInterrupt``, exit 130); the last
checkpoint stands. ``kill -9`` loses the work since the last checkpoint.

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
test sets; only rank 0 writes. After every step the ranks all-reduce two flags
(a stop requested, a checkpoint due), so all of them checkpoint and stop at the
same step.

Run folder: ``config.toml``, ``checkpoint.pt``, ``metrics.json``, ``model.pt``, ``model.json``,
``confusion.csv`` (test split, the exported model).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mcpipe.atomic import write_json_atomic
from mcpipe.cleaner.head_file import load_head
from mcpipe.cleaner.model import Head
from mcpipe.cleaner.noise import noise_from_config
from mcpipe.cleaner.sampler import SubsetSampler
from mcpipe.cleaner.split import stratified_holdout
from mcpipe.config import Config, to_toml
from mcpipe.devices import resolve_device
from mcpipe.distributed import DistInfo, barrier, init, shutdown
from mcpipe.errors import ConfigError, DataError
from mcpipe.extract.backbones import build_backbone
from mcpipe.extract.data import ignore_stop_signals
from mcpipe.extract.preprocess import Preprocess, preprocess_for, train_transform
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.extract.sources.registry import available_splits, load_index
from mcpipe.faults import pause_at
from mcpipe.finetune import checkpoint
from mcpipe.finetune.checkpoint import Checkpoint
from mcpipe.finetune.data import ShuffledBatches, SubsetBatches, TrainImages, collate
from mcpipe.finetune.export import export_model
from mcpipe.finetune.model import Net
from mcpipe.finetune.schedule import phase_scheduler
from mcpipe.finetune.train import (EpochState, evaluate, gather_partial, on_every_rank, resumed_state,
                                   train_epoch)
from mcpipe.labels import labels_toml, read_label_file
from mcpipe.loading import load_state_checked
from mcpipe.progress import progress_bar
from mcpipe.rundir import check_run_dir, start_run_dir, write_confusion
from mcpipe.stopping import StopRequest, stop_on_signals

log = logging.getLogger(__name__)

RUN_FILES = ("config.toml", "checkpoint.pt", "metrics.json", "model.pt", "model.json", "confusion.csv")
SECTIONS = ("data", "extract", "noise", "cleaner", "finetune")


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
    """Train, evaluate and export into ``out``; returns the metrics (also in ``out/metrics.json``).
    SIGTERM/SIGUSR1 stop it resumably (``Preempted``, see the module's docstring)."""
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


@dataclass
class _Job:
    """What a run trains, evaluates and writes, set up once before the first step."""

    cfg: Config
    info: DistInfo
    device: torch.device
    out: Path
    config_text: str
    net: Net
    provenance: dict  # the backbone's weights when training started
    pre: Preprocess
    amp: bool
    train: SplitIndex
    given: np.ndarray  # the training rows' given (noisy) labels
    val: SplitIndex | None
    test: SplitIndex | None
    clean: SplitIndex | None
    labels_record: dict | None
    progress: bool
    stop: StopRequest

    @property
    def keep_best(self) -> bool:
        """model.pt is written when the best epoch is reached (rather than at the end)."""
        return self.cfg.finetune.export == "best" and self.val is not None

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in plan(self.cfg))


@dataclass
class _Totals:
    """What the run has done so far, over all its starts: carried by every checkpoint."""

    history: list[dict] = field(default_factory=list)
    begin: dict | None = None  # with --head: the evaluation before any step
    replaced: int = 0  # in completed epochs
    seconds_before: float = 0.0  # of earlier starts
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, ckpt: Checkpoint | None) -> "_Totals":
        return cls() if ckpt is None else cls(ckpt.history, ckpt.start, ckpt.replaced, ckpt.seconds)

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


def _run(cfg: Config, info: DistInfo, device: torch.device, out: Path, head_run: Path | None, resume: bool,
         overwrite: bool, progress: bool, stop: StopRequest) -> dict:
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
        totals = _Totals.resumed(ckpt)
        if ckpt is None and head_run is not None and job.val is not None:
            _evaluate_start(job, totals)
        clock = checkpoint.Clock(cfg.finetune.checkpoint_minutes * 60)
        epoch = 0
        for phase in plan(cfg):
            epoch = _train_phase(job, phase, epoch, ckpt, totals, clock)
        metrics = _metrics(cfg, totals.history, job.train, job.given, job.val, totals.seconds(), totals.replaced,
                           totals.begin, labels=job.labels_record)
        if info.is_main:
            if not job.keep_best:  # (the best epoch's model was written when it was reached; confusion.csv every epoch)
                _export(job, metrics, None)
            write_json_atomic(metrics, out / "metrics.json")
    barrier(info)
    return metrics


def _prepare(cfg: Config, info: DistInfo, device: torch.device, out: Path, config_text: str, head_run: Path | None,
             progress: bool, stop: StopRequest) -> _Job:
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
    return _Job(cfg, info, device, out, config_text, net, backbone.provenance, pre, amp, train, given, val, test,
                clean, labels_record, progress, stop)


def _evaluated(job: _Job) -> tuple[dict, np.ndarray | None]:
    """Top-1 on validation (given and clean labels) and test, cleaner removed; the test confusion counts."""
    f = job.cfg.finetune
    kw = dict(device=job.device, amp=job.amp, batch_size=f.batch_size, workers=f.workers, info=job.info)
    scores, confusion = {}, None
    if job.val is not None:  # the same eval transform, sharding and all-reduce as the test split
        scores.update(evaluate(job.net, job.val, job.pre, name="val", clean=True, **kw)[0])
    if job.test is not None:
        more, confusion = evaluate(job.net, job.test, job.pre, **kw)
        scores.update(more)
    return scores, confusion


def _export(job: _Job, metrics: dict, confusion: np.ndarray | None) -> None:
    e = job.cfg.extract
    export_model(job.out, job.net, backbone=e.backbone, image_size=e.image_size, classes=job.train.classes,
                 pre=job.pre, provenance=job.provenance,
                 metrics={k: metrics[k] for k in ("test_accuracy", "test_top5") if k in metrics})
    if confusion is not None:
        write_confusion(confusion, list(job.test.classes), job.out / "confusion.csv")


def _evaluate_start(job: _Job, totals: _Totals) -> None:
    """With --head: the network as the head left it is a candidate too; fine-tuning must beat it on validation."""
    scores, confusion = _evaluated(job)
    totals.begin = {"epoch": 0, "phase": "start", **scores}
    if job.info.is_main:
        log.info("start (the head on the pretrained backbone): val top-1 %.4f%s", totals.begin["val_top1"],
                 f", test top-1 {totals.begin['test_top1']:.4f}" if "test_top1" in totals.begin else "")
        if job.keep_best:
            _export(job, _metrics(job.cfg, [], job.train, job.given, job.val, 0.0, 0, totals.begin,
                                  labels=job.labels_record), confusion)
    barrier(job.info)


def _train_phase(job: _Job, phase: Phase, first: int, ckpt: Checkpoint | None, totals: _Totals,
                 clock: checkpoint.Clock) -> int:
    """Train (the rest of) ``phase``, whose first epoch is the run's epoch ``first``; -> its last epoch + 1."""
    done = ckpt.epoch if ckpt is not None else 0
    if first + phase.epochs <= done:
        return first + phase.epochs
    f, info = job.cfg.finetune, job.info
    index, labels = (job.clean, job.clean.labels) if phase.name == "clean" else (job.train, job.given)
    dataset = TrainImages(index, labels, train_transform(job.pre, crop_scale=f.crop_scale), seed=f.seed,
                          min_size=job.pre.resize)
    subsets = (SubsetSampler(labels, subset_size=job.net.head.cleaner.subset_size, batch_size=f.batch_size,
                             seed=f.seed) if phase.cleaner else None)

    def batches(epoch: int, start: int = 0) -> SubsetBatches | ShuffledBatches:
        where = dict(rank=info.rank, world=info.world_size, start=start)
        return (SubsetBatches(subsets, epoch, **where) if phase.cleaner else
                ShuffledBatches(len(index), f.batch_size, epoch, seed=f.seed, **where))

    steps = batches(first).steps
    if steps == 0:
        raise DataError(f"split {index.split!r} has {len(index)} images: not one batch of "
                        f"{f.batch_size} per process; lower finetune.batch_size")
    optimizer, scheduler = _optimizer(job.net, job.cfg, phase.epochs, steps)
    if ckpt is not None and ckpt.phase == phase.name and (done > first or ckpt.inside_epoch):
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
    labels_t = torch.from_numpy(labels).to(job.device)
    model, wrapped_for = job.net, None
    for epoch in range(max(first, done), first + phase.epochs):
        trainable = f.backbone_lr > 0 and not (phase.name == "cleaner" and epoch - first < f.freeze_epochs)
        job.net.set_backbone_trainable(trainable)
        if info.enabled and wrapped_for != trainable:  # DDP holds the parameters that need gradients
            model, wrapped_for = _ddp(job, phase), trainable
        at = ckpt.step if ckpt is not None and epoch == done else 0
        state = resumed_state(epoch, steps, at, ckpt.partial if at else None, ckpt.partial_seconds if at else 0.0,
                              info.rank)
        loader = DataLoader(dataset, batch_sampler=batches(epoch, state.step), num_workers=f.workers,
                            collate_fn=collate, pin_memory=job.device.type == "cuda",
                            worker_init_fn=ignore_stop_signals)
        saver = _StepCheckpoints(job, phase, optimizer, scheduler, totals, clock)
        name = f"{phase.name} {epoch + 1}/{job.total_epochs}"
        with progress_bar(job.progress and info.is_main) as bar:
            task = bar.add_task(name, total=steps * f.batch_size, completed=state.step * f.batch_size)
            stats = train_epoch(model, job.net, loader, labels_t, state, cleaner=phase.cleaner, optimizer=optimizer,
                                scheduler=scheduler, device=job.device, amp=job.amp, info=info, seed=f.seed,
                                after_step=saver,
                                on_batch=lambda k, msg: bar.update(task, advance=k, description=f"{name} {msg}"))
        row = {"epoch": epoch + 1, "phase": phase.name, "loss": stats["loss"],
               "lr": optimizer.param_groups[-1]["lr"], "backbone_lr": optimizer.param_groups[0]["lr"],
               "backbone_trained": trainable, "images_per_second": stats["images_per_second"]}
        _end_epoch(job, row, stats["replaced"], saver, totals)
    return first + phase.epochs


def _ddp(job: _Job, phase: Phase) -> DistributedDataParallel:
    device = job.device
    return DistributedDataParallel(job.net, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=not phase.cleaner,
                                   broadcast_buffers=not job.cfg.finetune.freeze_bn)  # fixed statistics: no sync


def _end_epoch(job: _Job, row: dict, replaced: int, saver: "_StepCheckpoints", totals: _Totals) -> None:
    """Evaluate the epoch just trained, export it if it is the best, write its checkpoint and metrics.json; then
    stop if a signal came (after the epoch's last step: during the evaluation or the export)."""
    info, epoch = job.info, row["epoch"]
    pause_at("finetune_evaluate")  # a test hook: the epoch is trained, its evaluation not begun
    scores, confusion = _evaluated(job)
    row.update(scores)
    totals.history.append(row)
    totals.replaced += replaced
    row["seconds"] = totals.seconds()  # wall time of the run so far, evaluations included
    if info.is_main:
        metrics = _metrics(job.cfg, totals.history, job.train, job.given, job.val, row["seconds"], totals.replaced,
                           totals.begin, labels=job.labels_record)
        if job.keep_best and metrics["best_epoch"] == epoch:  # before the checkpoint: a resume re-exports
            pause_at("finetune_export")  # a test hook
            _export(job, metrics, confusion)
        elif not job.keep_best and confusion is not None:
            write_confusion(confusion, list(job.test.classes), job.out / "confusion.csv")
        checkpoint.save(saver.checkpoint(epoch=epoch), job.out)
        write_json_atomic(metrics, job.out / "metrics.json")
        log.info("epoch %d/%d (%s): loss %.4f%s%s, %.1f img/s", epoch, job.total_epochs, row["phase"],
                 row["loss"], f", val top-1 {row['val_top1']:.4f}" if "val_top1" in row else "",
                 f", test top-1 {row['test_top1']:.4f}" if "test_top1" in row else "", row["images_per_second"])
    saver.clock.restart()
    # an all-reduce, so also a barrier: no rank goes on (or leaves) before rank 0 has written
    stop = on_every_rank([job.stop.requested], info, job.device)[0]
    if stop and epoch < job.total_epochs:  # after the last epoch only the export is left: it is finished
        _stop_with_the_others(job.stop)
        raise job.stop.preempted(f"checkpoint at the end of epoch {epoch} of {job.total_epochs} written to "
                                 f"{checkpoint.path_of(job.out)}")


def _stop_with_the_others(stop: StopRequest) -> None:
    """A rank that got no signal itself stops because another one did: its line says so."""
    if not stop.requested:
        stop.signal_name = stop.signal_name or "another rank's signal"


@dataclass
class _StepCheckpoints:
    """Called after every training step: writes a checkpoint inside the epoch when ``checkpoint_minutes`` have
    passed since the last one, or when a signal asks to stop (then raises ``Preempted``). Every rank decides
    the same (the two flags are all-reduced), so all write (rank 0) and stop at the same step."""

    job: _Job
    phase: Phase
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    totals: _Totals
    clock: checkpoint.Clock

    def __call__(self, state: EpochState) -> None:
        job = self.job
        pause_at("finetune_step")  # a test hook: a step is done, its checkpoint not yet written
        stop, due = on_every_rank([job.stop.requested, self.clock.due()], job.info, job.device)
        if not (stop or due):
            return
        partial = gather_partial(state, job.info, job.device)  # a collective: every rank is here
        if job.info.is_main:
            checkpoint.save(self.checkpoint(epoch=state.epoch, step=state.step, partial=partial,
                                            partial_seconds=state.seconds), job.out)
        self.clock.restart()
        barrier(job.info)  # no rank leaves before rank 0 has written: torchrun ends the others when one exits
        if stop:
            _stop_with_the_others(job.stop)
            raise job.stop.preempted(f"checkpoint at epoch {state.epoch + 1} of {job.total_epochs}, step "
                                     f"{state.step} of {state.steps} written to {checkpoint.path_of(job.out)}")

    def checkpoint(self, *, epoch: int, step: int = 0, partial: dict | None = None,
                   partial_seconds: float = 0.0) -> Checkpoint:
        """The run as it stands: ``epoch`` epochs completed and ``step`` batches of the next one."""
        job, totals = self.job, self.totals
        return Checkpoint(model=job.net.state_dict(), optimizer=self.optimizer.state_dict(),
                          scheduler=self.scheduler.state_dict(), epoch=epoch, step=step, phase=self.phase.name,
                          history=totals.history, start=totals.begin, seconds=totals.seconds(),
                          replaced=totals.replaced, partial=partial, partial_seconds=partial_seconds,
                          world=job.info.world_size, config=job.config_text)


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
