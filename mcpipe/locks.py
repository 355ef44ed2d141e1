"""One writer per output: an exclusive lock held while a store or a run folder is written.

The lock is ``flock`` on a small file beside the output (``.train.h5.lock`` next
to ``train.h5``, ``.lock`` inside a run folder). The kernel drops it when its
holder exits in any way, ``kill -9`` and a crash included, so a lock never goes
stale and nobody has to delete it. The file stays: removing it would let two
processes lock two different files of the same name. It holds the pid of the
last holder, for the message a second process gets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mcpipe.errors import DataError, write_error

try:
    import fcntl
except ImportError:  # not POSIX: no locks, HDF5's own file locking still guards stores
    fcntl = None

log = logging.getLogger(__name__)


class OutputLock:
    """A held lock; ``release()`` (or leaving a ``with`` block, or the process ending) frees it."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _refusal(path: Path, what: str, writer: str) -> DataError:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    holder = f"{writer}, pid {pid}" if pid.isdigit() else writer
    return DataError(f"{what} is being written by another process ({holder}): wait for it to finish, "
                     f"or choose another --out (lock file {path})")


def acquire(path: Path, *, what: str, writer: str) -> OutputLock:
    """Lock ``path`` (created if missing) or refuse at once with a DataError saying that ``what``
    is being written by another process (``writer``, e.g. "mcpipe extract"). A folder where ``path``
    cannot be created is refused too."""
    if fcntl is None:
        return OutputLock(path, None)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise write_error(what, exc, then=f"its lock file {path} cannot be opened for writing") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _refusal(path, what, writer) from None
    except OSError as exc:  # e.g. a network file system without locks: write, unguarded
        log.warning("cannot lock %s (%s): nothing stops another process from writing %s meanwhile", path,
                    exc.strerror or exc, what)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    except OSError as exc:  # only the message's pid is lost
        log.debug("cannot record the pid in %s: %s", path, exc)
    return OutputLock(path, fd)


def refuse_if_locked(path: Path, *, what: str, writer: str) -> None:
    """Refuse now, touching nothing, if another process holds ``path``; a missing or unopenable file is no lock."""
    if fcntl is None or not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # acquire() explains it when the writing starts
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(path, what, writer) from None
    except OSError:
        pass  # no locks on this file system: acquire() warns
    finally:
        os.close(fd)
