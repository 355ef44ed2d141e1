"""``mcpipe extract``: the stage's one entry point, ``run(cfg, ...)``.

For each split: build the index, open (or resume) its store, extract the
blocks still missing, close. Under torchrun, ranks write shards that rank 0
joins (see ``distributed.py``).

SIGTERM or SIGUSR1 (``mcpipe.stopping``) stops the run after the block in
flight: the store is committed and closed as at the end of a run, and
:class:`~mcpipe.stopping.Preempted` says how many rows are kept; the same
command resumes. Under torchrun every rank stops so (see ``distributed.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

import mcpipe
from mcpipe import distributed
from mcpipe.atomic import write_text_atomic
from mcpipe.config import Config, to_toml
from mcpipe.devices import resolve_device
from mcpipe.distributed import DistInfo
from mcpipe.errors import DataError
from mcpipe.extract.backbones import Backbone, build_backbone, optimize_for_inference
from mcpipe.extract.data import BlockSampler, IndexImages, ignore_stop_signals
from mcpipe.extract.distributed import block_range, join_shards, shard_path
from mcpipe.extract.engine import BlockStats, extract_blocks
from mcpipe.extract.preprocess import Preprocess, eval_transform, preprocess_for
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.extract.sources.registry import available_splits, load_index
from mcpipe.progress import progress_bar
from mcpipe.stopping import StopRequest, stop_on_signals
from mcpipe.store.schema import SCHEMA_VERSION, Provenance
from mcpipe.store.writer import StoreSpec, StoreWriter

log = logging.getLogger(__name__)

_RESUME = "run the same command again to resume"
_RESUME_OVERWRITTEN = "run the same command without --overwrite to resume (with it, the stores start over)"


@dataclass
class SplitResult:
    split: str
    path: Path
    rows: int                  # rows in the store
    extracted: int = 0         # images run through the network by this command
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    complete: bool = False
    already_done: bool = False

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


def default_workers(device: torch.device) -> int:
    """Decoding processes: on CPU they compete with the network for cores, so few."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(16, cores - 1))
    return max(1, min(4, cores // 4))


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def store_spec(cfg: Config, index: SplitIndex, backbone: Backbone, pre: Preprocess, *,
               precision: str, device: torch.device, block_rows: int) -> StoreSpec:
    """The rows and provenance of ``index``'s store."""
    prov = backbone.provenance
    meaning = {  # what changes feature values: a store resumed with any other is refused
        "backbone": prov["backbone"], "weights_sha256": prov["weights_sha256"], "random_init": prov["random_init"],
        "weights": prov["weights"] if not prov["weights_sha256"] else "", "preprocessing": pre.to_dict(),
        "dtype": cfg.store.dtype, "precision": precision, "feature_dim": backbone.feature_dim,
        "schema": SCHEMA_VERSION,
    }
    provenance = Provenance(
        mcpipe_version=mcpipe.__version__, dataset=index.source, split=index.split, class_names=list(index.classes),
        backbone=prov["backbone"], weights=prov["weights"], weights_sha256=prov["weights_sha256"],
        random_init=bool(prov["random_init"]), image_size=pre.image_size,
        preprocessing=json.dumps(pre.to_dict(), sort_keys=True), precision=precision, device=str(device),
        data_root=str(index.root), source_fingerprint=index.fingerprint(), config_fingerprint=_fingerprint(meaning))
    attrs = {**provenance.attrs(), "config_toml": to_toml(cfg, ("data", "extract", "store")),
             "created_unix": time.time()}
    return StoreSpec(ids=index.ids, labels=index.labels, clean_labels=index.clean_labels,
                     verified=index.verified, feature_dim=backbone.feature_dim, dtype=cfg.store.dtype,
                     block_rows=block_rows, chunk_rows=cfg.store.chunk_rows, attrs=attrs)


def _existing_block_rows(path: Path) -> int | None:
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs["block_rows"])
    except (OSError, KeyError):
        return None  # StoreWriter.open explains what is wrong with it


class _Extractor:
    """Runs one split's blocks through the model into a store."""

    def __init__(self, cfg: Config, model: torch.nn.Module, pre: Preprocess, device: torch.device, bar,
                 stop: StopRequest):
        self.cfg = cfg
        self.model = model
        self.pre = pre
        self.device = device
        self.bar = bar
        self.stop = stop
        workers = cfg.extract.num_workers
        self.workers = default_workers(device) if workers < 0 else workers

    def fill(self, writer: StoreWriter, index: SplitIndex, *, label: str) -> tuple[BlockStats, float]:
        """Extract the pending blocks of ``writer``, whose rows are those of ``index`` (until a stop request)."""
        blocks = writer.pending_blocks()
        if not blocks:
            return BlockStats(), 0.0
        sampler = BlockSampler(blocks, block_rows=writer.block_rows, num_rows=writer.spec.num_rows)
        dataset = IndexImages(index, eval_transform(self.pre), image_size=self.pre.image_size,
                              min_size=self.pre.resize)
        cuda = self.device.type == "cuda"
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=self.workers, pin_memory=cuda,
                            prefetch_factor=4 if self.workers > 0 else None, worker_init_fn=ignore_stop_signals)
        todo = sum(len(sampler.rows(b)) for b in blocks)
        task = self.bar.add_task(label, total=todo)
        writer.on_commit = lambda done: log.debug("%s: committed blocks %s", label, done)
        start = time.perf_counter()
        stats = extract_blocks(self.model, loader, blocks, writer, device=self.device,
                               ids=index.ids, strict=self.cfg.extract.strict,
                               on_batch=lambda n: self.bar.advance(task, n), stop=self.stop)
        return stats, time.perf_counter() - start


def _already_complete(path: Path, spec: StoreSpec) -> bool:
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            return bool(a.get("complete")) and a.get("source_fingerprint") == spec.attrs["source_fingerprint"] \
                and a.get("config_fingerprint") == spec.attrs["config_fingerprint"]
    except OSError:
        return False


def _rows_written(path: Path) -> int:
    """Rows of the store at ``path`` flagged as written (0 when there is none yet)."""
    if not path.exists():
        return 0
    try:
        with h5py.File(path, "r") as f:
            return int(f["written"][:].sum())
    except (OSError, KeyError):
        return 0


def _stop_now(ex: _Extractor, info: DistInfo, rows_in: Path, store: Path, total: int, *, overwrite: bool) -> None:
    """Raise Preempted if a stop was requested (of any rank: every rank must call this) and rows of ``store``
    are left to write; the message counts those written (of ``rows_in``, this rank's shard or the store itself,
    summed over ranks). With every row written, the store is finished (seconds) rather than left incomplete."""
    if not info.enabled and not ex.stop.requested:
        return
    stop, rows = distributed.sum_over_ranks(info, [int(ex.stop.requested), _rows_written(rows_in)], ex.device)
    if stop and rows < total:
        raise ex.stop.preempted(f"{rows:,} of {total:,} rows of {store.name} written ({store})",
                                _RESUME_OVERWRITTEN if overwrite else _RESUME)


def _fill(ex: _Extractor, writer: StoreWriter, index: SplitIndex, result: SplitResult, *, label: str) -> None:
    stats, result.seconds = ex.fill(writer, index, label=label)
    result.extracted, result.skipped = stats.images, stats.skipped


def extract_split(ex: _Extractor, index: SplitIndex, spec_for, *, out: Path, info: DistInfo,
                  overwrite: bool) -> SplitResult:
    """Extract one split into ``out/<split>.h5`` (through shards under torchrun).

    Raises Preempted, the store committed and closed, when ``ex.stop`` is requested before the last block."""
    path = out / f"{index.split}.h5"
    block_rows = (None if overwrite else _existing_block_rows(path)) or ex.cfg.extract.batch_size
    spec = spec_for(index, block_rows)
    result = SplitResult(split=index.split, path=path, rows=len(index))
    if not overwrite and _already_complete(path, spec):
        result.complete = result.already_done = True
        return result
    if info.enabled:
        _extract_sharded(ex, index, spec, spec_for, block_rows, result, out=out, info=info, overwrite=overwrite)
    else:
        _stop_now(ex, info, path, path, len(index), overwrite=overwrite)
        with StoreWriter.open(path, spec, overwrite=overwrite, sync_seconds=ex.cfg.store.sync_seconds) as writer:
            if block_rows != ex.cfg.extract.batch_size:
                log.info("resuming %s in its own blocks of %d rows", path, block_rows)
            _fill(ex, writer, index, result, label=index.split)
        _stop_now(ex, info, path, path, len(index), overwrite=overwrite)
    result.complete = bool(_already_complete(path, spec))
    return result


def _extract_sharded(ex: _Extractor, index: SplitIndex, spec: StoreSpec, spec_for, block_rows: int,
                     result: SplitResult, *, out: Path, info: DistInfo, overwrite: bool) -> None:
    """Under torchrun: each rank extracts its range of blocks into its own shard store, then rank 0 joins the
    shards into ``out/<split>.h5`` (and removes them) while the others wait."""
    path = result.path
    num_blocks = -(-len(index) // block_rows)
    ranges = [block_range(num_blocks, DistInfo(r, info.world_size)) for r in range(info.world_size)]
    first, stop = ranges[info.rank]
    lo, hi = first * block_rows, min(stop * block_rows, len(index))
    shard_index = index.take(np.arange(lo, hi))
    shard = shard_path(out, index.split, info)
    _stop_now(ex, info, shard, path, len(index), overwrite=overwrite)  # every rank goes on, or every rank stops
    with StoreWriter.open(shard, spec_for(shard_index, block_rows), overwrite=overwrite,
                          sync_seconds=ex.cfg.store.sync_seconds) as writer:
        _fill(ex, writer, shard_index, result, label=f"{index.split} [rank {info.rank}]")
    _stop_now(ex, info, shard, path, len(index), overwrite=overwrite)  # (a barrier too) before rank 0 joins
    if info.is_main:
        shards = [(shard_path(out, index.split, DistInfo(r, info.world_size)), ranges[r][0])
                  for r in range(info.world_size)]
        with StoreWriter.open(path, spec, overwrite=overwrite, sync_seconds=ex.cfg.store.sync_seconds) as writer:
            join_shards(shards, writer)
        for p, _ in shards:
            p.unlink(missing_ok=True)
        log.info("joined %d shards into %s", len(shards), path)
    distributed.barrier(info)


def run(cfg: Config, *, out: Path | None = None, overwrite: bool = False, progress: bool = True) -> list[SplitResult]:
    """Extract every configured split of ``cfg.data`` into stores under ``out``.

    Raises Preempted on SIGTERM or SIGUSR1, after the block in flight (see the module docstring)."""
    with stop_on_signals() as stop:
        return _run(cfg, out=Path(out if out is not None else cfg.store.dir), overwrite=overwrite,
                    progress=progress, stop=stop)


def _run(cfg: Config, *, out: Path, overwrite: bool, progress: bool, stop: StopRequest) -> list[SplitResult]:
    info = DistInfo.from_env()
    device = resolve_device(cfg.extract.device, key="extract.device", local_rank=info.local_rank)
    distributed.init(info, device)
    try:
        splits = list(cfg.data.splits) or available_splits(cfg.data)
        indexes = [load_index(cfg.data, s) for s in splits]  # all indexes first: bad data fails before any work
        backbone = build_backbone(cfg.extract.backbone, cfg.extract.weights, image_size=cfg.extract.image_size)
        pre = preprocess_for(cfg.extract.backbone, cfg.extract.image_size, cfg.extract.resize)
        precision = "bf16" if device.type == "cuda" else "fp32"
        model = optimize_for_inference(backbone, device)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot use {out} as the output folder: {exc.strerror or exc}") from None
        results = []
        with progress_bar(progress and info.is_main) as bar:
            ex = _Extractor(cfg, model, pre, device, bar, stop)

            def spec_for(index: SplitIndex, block_rows: int) -> StoreSpec:
                return store_spec(cfg, index, backbone, pre, precision=precision, device=device,
                                  block_rows=block_rows)

            for index in indexes:
                results.append(extract_split(ex, index, spec_for, out=out, info=info, overwrite=overwrite))
        if info.is_main:
            write_text_atomic(to_toml(cfg, ("data", "extract", "store")), out / "config.toml",
                              then="the stores are complete")
        return results
    finally:
        distributed.shutdown(info)
