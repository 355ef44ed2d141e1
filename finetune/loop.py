"""The training loop of ``mcpipe finetune``: epochs, evaluations, checkpoints, stops and the best epoch's export.

``train`` walks the run's epochs (``mcpipe.finetune.plan.epoch_schedule``) from the checkpoint's on::

    for epoch in range(start, len(schedule)):
        (entering a phase: its data set, sampler, SGD and per-step schedule, restored when resuming inside it)
        train_one_epoch(...); evaluate_epoch(...); export(...); save(...); stop if a signal came

Each phase starts its own SGD (momentum, one learning rate for the backbone, one for the head) and per-step
schedule (``mcpipe.finetune.schedule``: cosine or step, after a linear warm-up). After every epoch, with the
cleaner removed: top-1 on the validation set against its given labels (and against its clean labels where
known), top-1/top-5 on ``test_split``; then ``checkpoint.pt`` (atomic, see ``mcpipe.finetune.checkpoint``)
and ``metrics.json``. Inside an epoch a checkpoint is also written every ``checkpoint_minutes`` (after a
step: it holds the sampler's position). A resumed run continues from the last checkpoint, inside an epoch
too, to the numbers an uninterrupted run gives on the same device.

SIGTERM or SIGUSR1 (``mcpipe.stopping``): the step in flight finishes, a checkpoint is written and the run
stops with ``Preempted`` (exit 75, one line saying how to resume). A signal during start-up takes effect
after the first step; one during an epoch's evaluation or export after that epoch's checkpoint (the
evaluation is not cut short: under torchrun its shards meet in an all-reduce that a rank leaving early would
leave waiting). A second signal a second or more later stops at once (``KeyboardInterrupt``, exit 130); the
last checkpoint stands. ``kill -9`` loses the work since the last checkpoint.

Model selection (``select``) is on validation only, never on the test split: ``best_epoch`` is the epoch of
the highest validation top-1 and ``test_accuracy_at_best_epoch`` the test top-1 there. With ``--head``, the
network as the head leaves it is evaluated before any step (``start``, epoch 0) and is a candidate too. With
``finetune.export = "best"`` and a validation set, ``model.pt`` + ``model.json`` (``mcpipe.finetune.export``)
and ``confusion.csv`` are written when the best epoch is reached; otherwise ``mcpipe.finetune.run`` exports
the last epoch's model at the end.

Under ``torchrun`` every process trains a DistributedDataParallel replica on its own batches (disjoint
subsets) and evaluates a shard of the validation and test sets; only rank 0 writes. After every step the
ranks all-reduce two flags (a stop requested, a checkpoint due), so all of them checkpoint and stop at the
same step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mcpipe.cleaner.sampler import SubsetSampler
from mcpipe.config import Config
from mcpipe.distributed import DistInfo, barrier
from mcpipe.errors import DataError
from mcpipe.extract.data import ignore_stop_signals
from mcpipe.extract.preprocess import Preprocess, train_transform
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.faults import pause_at
from mcpipe.finetune import checkpoint
from mcpipe.finetune.checkpoint import Checkpoint
from mcpipe.finetune.data import ShuffledBatches, SubsetBatches, TrainImages, collate
from mcpipe.finetune.export import export_model
from mcpipe.finetune.model import Net
from mcpipe.finetune.plan import Epoch, Phase, epoch_schedule, plan
from mcpipe.finetune.schedule import phase_scheduler
from mcpipe.finetune.train import (EpochState, Training, evaluate, gather_partial, on_every_rank, resumed_state,
                                   train_epoch)
from mcpipe.progress import progress_bar
from mcpipe.records import FinetuneEpoch, FinetuneMetrics, Noise, write_metrics
from mcpipe.rundir import write_confusion
from mcpipe.stopping import StopRequest

log = logging.getLogger(__name__)


@dataclass
class Job:
    """What a run trains, evaluates and writes, set up once before the first step (``mcpipe.finetune.run``)."""

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
class Totals:
    """What the run has done so far, over all its starts: carried by every checkpoint."""

    history: list[FinetuneEpoch] = field(default_factory=list)
    begin: FinetuneEpoch | None = None  # with --head: the evaluation before any step
    replaced: int = 0  # in completed epochs
    seconds_before: float = 0.0  # of earlier starts
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, ckpt: Checkpoint | None) -> "Totals":
        return cls() if ckpt is None else cls(ckpt.history, ckpt.start, ckpt.replaced, ckpt.seconds)

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


@dataclass
class _InPhase:
    """The phase being trained: what its epochs share, made when the loop enters it."""

    phase: Phase
    dataset: TrainImages
    batches: Callable[..., SubsetBatches | ShuffledBatches]  # (epoch, start=0) -> this rank's batches
    steps: int  # batches per epoch and process
    training: Training
    saver: _StepCheckpoints  # after every step: checkpoints inside the epoch, stops
    wrapped_for: bool | None = None  # under torchrun: backbone_trains when training.model was wrapped


def train(job: Job, ckpt: Checkpoint | None, *, evaluate_start: bool) -> FinetuneMetrics:
    """Train the run's epochs from the checkpoint's on (all of them without one); -> the metrics.
    ``evaluate_start`` (``--head``, a fresh run): the network before any step is evaluated as epoch 0."""
    totals = Totals.resumed(ckpt)
    if ckpt is None and evaluate_start and job.val is not None:
        _evaluate_start(job, totals)
    schedule = epoch_schedule(job.cfg)
    clock = checkpoint.Clock(job.cfg.finetune.checkpoint_minutes * 60)
    start = 0 if ckpt is None else ckpt.epoch
    current: _InPhase | None = None
    for epoch in range(start, len(schedule)):
        e = schedule[epoch]
        if current is None or current.phase != e.phase:
            current = _enter_phase(job, e, ckpt if epoch == start else None, totals, clock)
        resume_at = ckpt if ckpt is not None and epoch == start and ckpt.inside_epoch else None
        trained, replaced = train_one_epoch(job, current, e, resume_at)
        row, confusion = evaluate_epoch(job, trained, totals)
        totals.history.append(row)
        totals.replaced += replaced
        if job.info.is_main:
            metrics = run_metrics(job, totals)
            export(job, metrics, confusion)  # before the checkpoint: a resume exports again
            checkpoint.save(current.saver.checkpoint(epoch=row.epoch), job.out)
            write_metrics(metrics, job.out / "metrics.json")
            _log_epoch(job, row)
        clock.restart()
        _stop_if_asked(job, row.epoch)
    return run_metrics(job, totals)


def _enter_phase(job: Job, first: Epoch, ckpt: Checkpoint | None, totals: Totals,
                 clock: checkpoint.Clock) -> _InPhase:
    """The data set, sampler, SGD and schedule of ``first``'s phase, ``first`` being the loop's first epoch in
    it; the SGD and schedule as ``ckpt`` left them when it was written inside this phase."""
    f, info, phase = job.cfg.finetune, job.info, first.phase
    index, labels = (job.clean, job.clean.labels) if phase.name == "clean" else (job.train, job.given)
    dataset = TrainImages(index, labels, train_transform(job.pre, crop_scale=f.crop_scale), seed=f.seed,
                          min_size=job.pre.resize)
    subsets = (SubsetSampler(labels, subset_size=job.net.head.cleaner.subset_size, batch_size=f.batch_size,
                             seed=f.seed) if phase.cleaner else None)

    def batches(epoch: int, start: int = 0) -> SubsetBatches | ShuffledBatches:
        where = dict(rank=info.rank, world=info.world_size, start=start)
        return (SubsetBatches(subsets, epoch, **where) if phase.cleaner else
                ShuffledBatches(len(index), f.batch_size, epoch, seed=f.seed, **where))

    steps = batches(first.index).steps  # the same every epoch
    if steps == 0:
        raise DataError(f"split {index.split!r} has {len(index)} images: not one batch of "
                        f"{f.batch_size} per process; lower finetune.batch_size")
    optimizer, scheduler = _optimizer(job.net, job.cfg, phase.epochs, steps)
    if ckpt is not None and ckpt.phase == phase.name and (first.in_phase > 0 or ckpt.inside_epoch):
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
    training = Training(job.net, job.net, optimizer, scheduler, torch.from_numpy(labels).to(job.device),
                        phase.cleaner, job.device, job.amp, info, f.seed)
    saver = _StepCheckpoints(job, phase, optimizer, scheduler, totals, clock)
    return _InPhase(phase, dataset, batches, steps, training, saver)


def train_one_epoch(job: Job, current: _InPhase, e: Epoch, ckpt: Checkpoint | None) -> tuple[FinetuneEpoch, int]:
    """Epoch ``e`` (the rest of it from ``ckpt``'s position, written inside it); -> (its history row without
    the evaluation, the images replaced)."""
    f, info, t = job.cfg.finetune, job.info, current.training
    job.net.set_backbone_trainable(e.backbone_trains)
    if info.enabled and current.wrapped_for != e.backbone_trains:  # DDP holds the parameters that need gradients
        t.model, current.wrapped_for = _ddp(job, e.phase), e.backbone_trains
    at = ckpt.step if ckpt is not None else 0
    state = resumed_state(e.index, current.steps, at, ckpt.partial if at else None,
                          ckpt.partial_seconds if at else 0.0, info.rank)
    loader = DataLoader(current.dataset, batch_sampler=current.batches(e.index, state.step), num_workers=f.workers,
                        collate_fn=collate, pin_memory=job.device.type == "cuda", worker_init_fn=ignore_stop_signals)
    name = f"{e.phase.name} {e.index + 1}/{job.total_epochs}"
    with progress_bar(job.progress and info.is_main) as bar:
        task = bar.add_task(name, total=current.steps * f.batch_size, completed=state.step * f.batch_size)
        stats = train_epoch(t, loader, state, after_step=current.saver,
                            on_batch=lambda k, msg: bar.update(task, advance=k, description=f"{name} {msg}"))
    row = FinetuneEpoch(e.index + 1, e.phase.name, stats["loss"], lr=t.optimizer.param_groups[-1]["lr"],
                        backbone_lr=t.optimizer.param_groups[0]["lr"], backbone_trained=e.backbone_trains,
                        images_per_second=stats["images_per_second"])
    return row, stats["replaced"]


def _ddp(job: Job, phase: Phase) -> DistributedDataParallel:
    device = job.device
    return DistributedDataParallel(job.net, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=not phase.cleaner,
                                   broadcast_buffers=not job.cfg.finetune.freeze_bn)  # fixed statistics: no sync


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


def _evaluated(job: Job) -> tuple[dict, np.ndarray | None]:
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


def write_model(job: Job, metrics: FinetuneMetrics, confusion: np.ndarray | None) -> None:
    """``model.pt`` + ``model.json`` of the network as it is now, and ``confusion.csv`` when given."""
    e = job.cfg.extract
    export_model(job.out, job.net, backbone=e.backbone, image_size=e.image_size, classes=job.train.classes,
                 pre=job.pre, provenance=job.provenance,
                 metrics={k: v for k, v in (("test_accuracy", metrics.test_accuracy),
                                            ("test_top5", metrics.test_top5)) if v is not None})
    if confusion is not None:
        write_confusion(confusion, list(job.test.classes), job.out / "confusion.csv")


def _evaluate_start(job: Job, totals: Totals) -> None:
    """With --head: the network as the head left it is a candidate too; fine-tuning must beat it on validation."""
    scores, confusion = _evaluated(job)
    totals.begin = FinetuneEpoch(0, "start", **scores)
    if job.info.is_main:
        log.info("start (the head on the pretrained backbone): val top-1 %.4f%s", totals.begin.val_top1,
                 "" if totals.begin.test_top1 is None else f", test top-1 {totals.begin.test_top1:.4f}")
        if job.keep_best:
            write_model(job, run_metrics(job, Totals(begin=totals.begin)), confusion)
    barrier(job.info)


def evaluate_epoch(job: Job, trained: FinetuneEpoch, totals: Totals) -> tuple[FinetuneEpoch, np.ndarray | None]:
    """The epoch just trained, evaluated with the cleaner removed: its history row (with the run's wall time so
    far, evaluations included) and the test confusion counts. Every rank takes part (the shards meet in an
    all-reduce)."""
    pause_at("finetune_evaluate")  # a test hook: the epoch is trained, its evaluation not begun
    scores, confusion = _evaluated(job)
    return replace(trained, **scores, seconds=totals.seconds()), confusion


def export(job: Job, metrics: FinetuneMetrics, confusion: np.ndarray | None) -> None:
    """Rank 0, after an epoch: the model if this epoch is the best so far (``finetune.export = "best"``), else
    only the test confusion counts (the last epoch's model is exported when the run ends)."""
    if job.keep_best and metrics.best_epoch == metrics.history[-1].epoch:
        pause_at("finetune_export")  # a test hook
        write_model(job, metrics, confusion)
    elif not job.keep_best and confusion is not None:
        write_confusion(confusion, list(job.test.classes), job.out / "confusion.csv")


def _log_epoch(job: Job, row: FinetuneEpoch) -> None:
    log.info("epoch %d/%d (%s): loss %.4f%s%s, %.1f img/s", row.epoch, job.total_epochs, row.phase, row.loss,
             "" if row.val_top1 is None else f", val top-1 {row.val_top1:.4f}",
             "" if row.test_top1 is None else f", test top-1 {row.test_top1:.4f}", row.images_per_second)


def _stop_if_asked(job: Job, epoch: int) -> None:
    """After epoch ``epoch``'s checkpoint: stop (``Preempted``) if a signal came to any rank during the epoch's
    last step, evaluation or export. An all-reduce, so also a barrier: no rank goes on (or leaves) before rank
    0 has written."""
    stop = on_every_rank([job.stop.requested], job.info, job.device)[0]
    if stop and epoch < job.total_epochs:  # after the last epoch only the export is left: it is finished
        raise job.stop.preempted(f"checkpoint at the end of epoch {epoch} of {job.total_epochs} written to "
                                 f"{checkpoint.path_of(job.out)}")


@dataclass
class _StepCheckpoints:
    """Called after every training step: writes a checkpoint inside the epoch when ``checkpoint_minutes`` have
    passed since the last one, or when a signal asks to stop (then raises ``Preempted``). Every rank decides
    the same (the two flags are all-reduced), so all write (rank 0) and stop at the same step."""

    job: Job
    phase: Phase
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    totals: Totals
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


def run_metrics(job: Job, totals: Totals) -> FinetuneMetrics:
    """``metrics.json`` of the run so far: what it trained on, its history and the epoch chosen on validation
    (:func:`select`)."""
    cfg, train, val = job.cfg, job.train, job.val
    m = FinetuneMetrics(history=totals.history, seconds=totals.seconds(), train_images=len(train),
                        images_replaced=totals.replaced,
                        phases=[{"name": p.name, "epochs": p.epochs, "split": p.split} for p in plan(cfg)],
                        noise=Noise(cfg.noise.kind, cfg.noise.rate, float((job.given != train.labels).mean())),
                        val_images=0 if val is None else len(val), val_from=None if val is None else val.split,
                        chosen_on="none" if val is None else "val", labels=job.labels_record, start=totals.begin)
    return select(m, export=cfg.finetune.export)


def select(m: FinetuneMetrics, *, export: str) -> FinetuneMetrics:
    """``m`` with its best epoch chosen on validation top-1 (given labels; ties: the earlier epoch), never on
    the test split; with ``--head``, epoch 0 (``m.start``: the head on the pretrained backbone, before any
    training) is a candidate too. The exported model is the best epoch's (``export = "best"``, with a
    validation set) or the last epoch's; ``test_accuracy`` / ``test_top5`` are the exported model's."""
    history = m.history
    validated = [h for h in ([m.start] if m.start is not None else []) + history if h.val_top1 is not None]
    best = None
    if validated:
        best = max(validated, key=lambda h: h.val_top1)  # max keeps the first of equals: the earlier epoch
        m.best_epoch, m.best_val_accuracy = best.epoch, best.val_top1
        m.val_clean_accuracy_at_best_epoch = best.val_clean_top1
        m.test_accuracy_at_best_epoch = best.test_top1
    exported = best if export == "best" and best is not None else (history[-1] if history else None)
    if exported is not None:
        m.exported_epoch = exported.epoch
        if exported.test_top1 is not None:
            m.test_accuracy, m.test_top5 = exported.test_top1, exported.test_top5
    tested = [h for h in history if h.test_top1 is not None]
    if tested:
        m.test_accuracy_last_epoch = tested[-1].test_top1
    return m
