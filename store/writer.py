"""Resumable, crash-safe writer of one feature store.

How it survives Ctrl-C, ``kill -9`` and power loss:

* The file is built under a temporary name (static datasets -- ids, labels --
  written in full) and renamed into place, so a half-created store never
  exists under the real name.
* ``features`` is chunked by rows with every chunk allocated at creation
  (``ALLOC_TIME_EARLY``, no compression): writing rows later changes raw data
  only, never HDF5 metadata, so an interrupted writer cannot leave the file's
  structure inconsistent.
* Rows are written in fixed blocks. A block's features are written and
  flushed first; its ``written`` flags are set only after an fsync (every
  ``sync_seconds``), so a flag on disk always means the features are on disk.
  A resumed run recomputes exactly the blocks not flagged; with the same block
  boundaries the finished store is identical to an uninterrupted one.
* The store's disk space is reserved when it is created: a disk too full
  for it (or a file-size limit) is refused before any image is read, and
  writing rows needs no more room, so a full disk cannot stop an extraction
  half-way (where the file system cannot reserve, a failed write is still one
  line and what was written before is kept). HDF5's chunk cache and sieve
  buffer are off while writing, so a write error surfaces in the call that
  caused it and leaves HDF5 nothing it cannot write.
* An ``flock`` on ``.<store>.lock`` beside the store (``mcpipe.locks``), held
  from ``open`` to ``close``, keeps a second process from writing the same
  store; HDF5's file lock keeps readers out meanwhile. Neither the lock nor the
  open store passes to a forked child (a DataLoader worker): see
  ``mcpipe.locks.detach_in_children``, so a run restarted at once after a
  ``kill -9`` is not refused by workers the killed one left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mcpipe.atomic import replacing
from mcpipe.errors import DataError, write_error
from mcpipe.faults import pause_at
from mcpipe.locks import OutputLock, acquire, detach_in_children, keep_in_children
from mcpipe.store.reader import is_lock_error
from mcpipe.store.schema import FEATURE_DTYPES, SCHEMA_VERSION

log = logging.getLogger(__name__)

_RESUME = "the rows written before are kept: run the same command again to go on"


@dataclass(frozen=True)
class StoreSpec:
    """Everything that defines a store's rows and the meaning of its features."""

    ids: list[str]
    labels: np.ndarray            # (N,) int64
    clean_labels: np.ndarray      # (N,) int64, -1 unknown
    feature_dim: int
    dtype: str                    # "float16" | "float32"
    block_rows: int
    chunk_rows: int
    attrs: dict[str, Any]         # provenance; must hold source_fingerprint and config_fingerprint
    verified: np.ndarray | None = None  # (N,) int8, optional
    paths: list[str] | None = None      # (N,) absolute image paths ("" = unknown), optional

    @property
    def num_rows(self) -> int:
        return len(self.ids)


def _unbuffered() -> h5py.h5p.PropFAID:
    """File access without HDF5's chunk cache and sieve buffer: raw data reaches the file in the call that
    writes it, so a write that fails (a full disk) fails there, rather than staying behind as data HDF5
    can never write -- h5py then cannot close the file, and the process crashes on its way out."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)  # h5py's default
    mdc, slots, _, w0 = fapl.get_cache()
    fapl.set_cache(mdc, slots, 0, w0)
    fapl.set_sieve_buf_size(0)
    return fapl


def _open_h5(path: Path, mode: str) -> h5py.File:
    try:
        if mode == "r+":
            return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=_unbuffered()))
        return h5py.File(path, mode)
    except PermissionError:
        raise DataError(f"cannot open store {path} for {'reading' if mode == 'r' else 'writing'}: "
                        "permission denied") from None
    except BlockingIOError:
        raise DataError(f"store {path} is open in another process (another mcpipe extract?); wait for it or "
                        "choose another --out") from None
    except OSError as exc:
        if is_lock_error(exc):
            raise DataError(f"store {path} is locked by another process (another mcpipe extract?); wait for it "
                            "or choose another --out") from None
        raise DataError(f"{path} exists but is not a readable feature store ({exc}); "
                        "use --overwrite to replace it") from None


def _refuse_if_locked(path: Path) -> None:
    """Never replace a store another process is writing."""
    try:
        _open_h5(path, "r").close()
    except DataError as exc:
        if "another process" in str(exc):
            raise
        # not a readable store: replacing it is what --overwrite asks for


def lock_path(path: Path) -> Path:
    """The file whose lock says that ``path`` is being written."""
    return path.with_name(f".{path.name}.lock")


def _room_needed(spec: StoreSpec) -> int:
    """Bytes a new store takes, a little more than HDF5 uses: features, per-row datasets, ids, attributes."""
    n, d = spec.num_rows, spec.feature_dim
    ids = sum(len(i.encode("utf-8")) + 40 for i in spec.ids)  # a heap id in the dataset, the string in a heap
    ids += sum(len(p.encode("utf-8")) + 40 for p in spec.paths or ())
    attrs = sum(len(str(v)) + 64 for v in spec.attrs.values())
    return n * d * np.dtype(spec.dtype).itemsize + n * 19 + ids + attrs + (64 << 10)


def _reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of disk to the open file ``fd`` (contents unchanged) where the OS can."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _create(path: Path, spec: StoreSpec) -> None:
    """Write a new, empty store to a temporary file, reserve its disk space and rename it to ``path``
    (``mcpipe.atomic.replacing``: ``path`` appears whole or not at all)."""
    if spec.dtype not in FEATURE_DTYPES:
        raise DataError(f"store dtype {spec.dtype!r} is invalid: expected one of {FEATURE_DTYPES}")
    need = _room_needed(spec)
    try:
        with replacing(path) as tmp:
            _write_empty(tmp, spec, need)
    except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for some failed writes
        raise write_error(f"store {path} (about {need / 2**20:.1f} MiB)", exc, action="create",
                          then="run the same command again when there is room") from None


def _write_empty(tmp: Path, spec: StoreSpec, need: int) -> None:
    """The store's every dataset and attribute, no row written, its disk space reserved."""
    n, d = spec.num_rows, spec.feature_dim
    # room first: a full disk or a size limit fails here as one OSError, not inside HDF5,
    # whose failed writes leave a file it can neither close nor let go of
    with open(tmp, "wb") as probe:
        _reserve(probe.fileno(), need)
    with h5py.File(tmp, "w") as f:  # truncates the probe: HDF5 writes into the room just found
        f.create_dataset("labels", data=np.asarray(spec.labels, dtype=np.int64))
        f.create_dataset("clean_labels", data=np.asarray(spec.clean_labels, dtype=np.int64))
        f.create_dataset("ids", data=np.array(spec.ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("written", data=np.zeros(n, dtype=bool))
        f.create_dataset("skipped", data=np.zeros(n, dtype=np.uint8))
        if spec.verified is not None:
            f.create_dataset("verified", data=np.asarray(spec.verified, dtype=np.int8))
        if spec.paths is not None:
            f.create_dataset("paths", data=np.array(spec.paths, dtype=object), dtype=h5py.string_dtype("utf-8"))
        # features last: what HDF5 writes now lies in the file's first bytes, the rows (not written
        # yet) after them, in the order a run fills them
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset("features", shape=(n, d), dtype=spec.dtype,
                         chunks=(max(1, min(spec.chunk_rows, n)), d), dcpl=dcpl, fill_time="never")
        for key, value in spec.attrs.items():
            f.attrs[key] = value
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["block_rows"] = spec.block_rows
        f.attrs["complete"] = False
    fd = os.open(tmp, os.O_RDWR)
    try:
        _reserve(fd, os.fstat(fd).st_size)  # every block of the store now: writing rows needs no more room
    finally:
        os.close(fd)


def _check_resumable(path: Path, spec: StoreSpec) -> None:
    """Refuse to resume a store made from other data or with another config."""
    with _open_h5(path, "r") as f:
        a = f.attrs
        if a.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"{path} has schema version {a.get('schema_version')}, this mcpipe writes "
                            f"{SCHEMA_VERSION}; use --overwrite to rebuild it")
        for key in ("source_fingerprint", "config_fingerprint"):
            old, new = a.get(key), spec.attrs[key]
            if old != new:
                what = "from other data (ids, labels or classes)" if key.startswith("source") else \
                    "with another extraction config (backbone, weights, preprocessing, dtype or precision)"
                raise DataError(f"{path} was written {what}: {key} {old!s:.12} != {new:.12}; "
                                "use --overwrite to start again, or another --out")
        if "features" not in f or f["features"].shape != (spec.num_rows, spec.feature_dim):
            raise DataError(f"{path} has features of another shape than {(spec.num_rows, spec.feature_dim)}; "
                            "use --overwrite to start again")


class StoreWriter:
    """Writes blocks of rows into one store; see the module docstring.

    Use ``StoreWriter.open(path, spec, overwrite=...)``, then ``write_block``
    for each pending block, then ``close()`` (also on errors: it commits what
    is on disk so a later run resumes from there).
    """

    def __init__(self, path: Path, spec: StoreSpec, *, sync_seconds: float = 5.0, lock: OutputLock | None = None):
        self.path = path  # the store must exist (``open`` creates it)
        self.spec = spec
        self.sync_seconds = sync_seconds
        self._lock = lock  # released by close()
        self._f = _open_h5(path, "r+")  # unbuffered: a failed write fails in write_block or commit
        try:  # forked workers must not keep the store open (nor HDF5's lock on it)
            self._fd: int | None = int(self._f.id.get_vfd_handle())
            detach_in_children(self._fd)
        except (OSError, TypeError, ValueError):  # non-POSIX driver: nothing to detach
            self._fd = None
        self._features = self._f["features"]
        self._written = self._f["written"]
        self._skipped = self._f["skipped"]
        self.block_rows = int(self._f.attrs["block_rows"])
        self._uncommitted: list[int] = []
        self._last_sync = time.monotonic()
        self.on_commit = None  # optional callback(list_of_blocks) after flags reach disk

    @classmethod
    def open(cls, path: str | Path, spec: StoreSpec, *, overwrite: bool = False,
             sync_seconds: float = 5.0) -> "StoreWriter":
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(f"store folder {path.parent}", exc, action="create") from None
        lock = acquire(lock_path(path), what=f"store {path}", writer="mcpipe extract")
        try:
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a killed writer's; the lock makes it ours
                stale.unlink(missing_ok=True)
            if path.exists() and not overwrite:
                _check_resumable(path, spec)
            else:
                if path.exists():
                    _refuse_if_locked(path)
                    log.info("--overwrite: replacing %s", path)
                _create(path, spec)  # atomic: an old store stays intact until the new one is in place
            return cls(path, spec, sync_seconds=sync_seconds, lock=lock)
        except BaseException:
            lock.release()
            raise

    # ------------------------------------------------------------------ blocks

    @property
    def num_blocks(self) -> int:
        return -(-self.spec.num_rows // self.block_rows)

    def block_range(self, b: int) -> tuple[int, int]:
        start = b * self.block_rows
        return start, min(start + self.block_rows, self.spec.num_rows)

    def pending_blocks(self) -> list[int]:
        """Blocks with at least one row not yet written, in order."""
        written = self._written[:]
        return [b for b in range(self.num_blocks) if not written[slice(*self.block_range(b))].all()]

    def write_block(self, b: int, features: np.ndarray, skipped: np.ndarray) -> None:
        """Write block ``b``: ``features`` (rows, D), ``skipped`` (rows,) uint8 reason codes."""
        start, stop = self.block_range(b)
        assert features.shape == (stop - start, self.spec.feature_dim), (features.shape, start, stop)
        assert skipped.shape == (stop - start,)
        try:
            self._features[start:stop] = features.astype(self.spec.dtype, copy=False)
            pause_at("block_write")
            self._skipped[start:stop] = skipped
            self._f.flush()
        except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for some failed writes
            raise write_error(f"rows {start}-{stop - 1} of {self.path}", exc, then=_RESUME) from None
        self._uncommitted.append(b)
        if time.monotonic() - self._last_sync >= self.sync_seconds:
            self.commit()

    def commit(self) -> None:
        """fsync the features written so far, then flag their blocks as written."""
        if not self._uncommitted:
            return
        try:
            self._fsync()
            for b in self._uncommitted:
                self._written[slice(*self.block_range(b))] = True
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            raise write_error(self.path, exc, then=_RESUME) from None
        done, self._uncommitted = self._uncommitted, []
        self._last_sync = time.monotonic()
        if self.on_commit is not None:
            self.on_commit(done)

    def _fsync(self) -> None:
        self._f.flush()
        try:
            fd = self._f.id.get_vfd_handle()
        except (OSError, TypeError, ValueError):  # non-POSIX driver: flush is all we can do
            return
        os.fsync(fd)  # a failure here means the rows may not be on disk: the caller must not flag them

    def close(self) -> bool:
        """Commit, set ``complete`` when every row is written, close, unlock. Returns completeness."""
        try:
            if not self._f.id.valid:
                return False
            try:
                self.commit()
                complete = bool(self._written[:].all())
                if complete:
                    pause_at("store_complete")
                if bool(self._f.attrs.get("complete")) != complete:  # no metadata write unless it changes
                    self._f.attrs["complete"] = complete
                self._fsync()
            finally:
                if self._fd is not None:
                    keep_in_children(self._fd)
                self._f.close()
            return complete
        except (OSError, RuntimeError) as exc:
            raise write_error(self.path, exc, then=_RESUME) from None
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        try:
            self.close()
        except DataError as exc:
            if exc_type is None:
                raise
            log.debug("closing %s after an error: %s", self.path, exc)  # the first error is the one to show
