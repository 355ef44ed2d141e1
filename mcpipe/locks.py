"""One writer per output: an exclusive lock held while a store or a run folder is written.

The lock is ``flock`` on a small file beside the output (``.train.h5.lock`` next
to ``train.h5``, ``.lock`` inside a run folder). The kernel drops it when its
holder exits in any way, ``kill -9`` and a crash included, so a lock never goes
stale and nobody has to delete it. The file stays: removing it would let two
processes lock two different files of the same name. It holds the pid (and
start time) of the last holder, for the message a second process gets.

A lock (like any flock, and HDF5's lock on an open store) belongs to the open
file description, which a forked child shares: a DataLoader worker forked while
the lock is held would keep it, and the store, for seconds after its parent was
killed, and a restart at once would be refused. So every descriptor that must
die with its process is registered with :func:`detach_in_children` (a held
lock here, an open store in ``mcpipe.store.writer``); in a forked child, before
any of its code runs, ``/dev/null`` takes its place (``dup2``): the child lets
go of the file at once, and nothing it might write through that number reaches
the file.
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

# descriptor -> (st_dev, st_ino) of its file when registered: a forked child replaces only a descriptor that
# still refers to that file, so a registration left behind after a close can never hit another file
_DETACHED: dict[int, tuple[int, int]] = {}


def detach_in_children(fd: int) -> None:
    """Make forked children let go of ``fd`` at once (see the module docstring); until :func:`keep_in_children`."""
    try:
        st = os.fstat(fd)
    except OSError:
        return
    _DETACHED[fd] = (st.st_dev, st.st_ino)


def keep_in_children(fd: int) -> None:
    """Undo :func:`detach_in_children`: call it before closing ``fd``."""
    _DETACHED.pop(fd, None)


def _detach_after_fork() -> None:
    """In a freshly forked child (one thread, the parent's memory): point each registered descriptor at
    /dev/null, dropping the child's share of the lock or open file. Never raises."""
    if not _DETACHED:
        return
    try:
        null = os.open(os.devnull, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        null = -1
    for fd, ident in list(_DETACHED.items()):
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ident:
                continue
            if null >= 0:
                os.dup2(null, fd, inheritable=False)
            else:  # no /dev/null: closing lets go too (the number may be reused, but the child never writes it)
                os.close(fd)
        except OSError:
            pass
    if null >= 0:
        os.close(null)
    _DETACHED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_detach_after_fork)


class OutputLock:
    """A held lock; ``release()`` (or leaving a ``with`` block, or the process ending) frees it."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            keep_in_children(self._fd)
            os.close(self._fd)  # closing the last descriptor (forked children hold none) drops the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None (no such file: not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()
    except OSError:
        return None


def _identity(pid: int) -> str:
    """``pid`` and, where the OS says it, the process's start time: a later process given the same pid differs."""
    fields = _stat(pid)
    return f"{pid} {fields[19].decode()}" if fields is not None and len(fields) > 19 else str(pid)


def _alive(identity: list[str]) -> bool:
    """Whether the process recorded as ``[pid, start time]`` (or ``[pid]``) still runs; a zombie (killed,
    not yet reaped by its parent) does not."""
    pid = int(identity[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user
        return True
    fields = _stat(pid)
    if fields is None or len(fields) <= 19:
        return True  # os.kill's answer stands
    return fields[0] != b"Z" and (len(identity) < 2 or fields[19].decode() == identity[1])


def _refusal(path: Path, what: str, writer: str) -> DataError:
    try:
        identity = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        identity = []
    if not (identity and all(x.isdigit() for x in identity)):
        identity = []
    if identity and not _alive(identity):  # never name a dead process as the writer
        return DataError(f"{what} is locked, though the process that last wrote it ({writer}, pid {identity[0]}) "
                         "has exited: a process it started may still hold the lock; try again in a few seconds, "
                         f"or choose another --out (lock file {path})")
    holder = f"{writer}, pid {identity[0]}" if identity else writer
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
        os.write(fd, f"{_identity(os.getpid())}\n".encode("ascii"))
    except OSError as exc:  # only the message's pid is lost
        log.debug("cannot record the pid in %s: %s", path, exc)
    detach_in_children(fd)
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
