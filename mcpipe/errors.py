"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, a store that is
not ours) is raised as one of these. The CLI turns them into one line on stderr
and an exit code, never a traceback:

* exit 2 -- usage or configuration errors (:class:`ConfigError`);
* exit 1 -- data errors: files, stores, images, checkpoints (:class:`DataError`).

typer's own usage errors (an unknown option, a missing argument) exit 2 as
well, and Ctrl-C exits 130 with what was written kept for a resume. The one
line names the offending file, key or value and what was expected, and a
refused command leaves every existing output as it was: validate inputs
before touching ``--out``. A single bad image is not an error: it is converted
or skipped and reported. ``tests/test_bad_inputs.py`` holds these promises.
"""

from __future__ import annotations

import errno
import os
import re


class MCPipeError(Exception):
    """Base class of every error meant to be shown to a user as one line."""

    exit_code = 1


class ConfigError(MCPipeError):
    """A configuration key, value or command-line option is wrong."""

    exit_code = 2


class DataError(MCPipeError):
    """Input data, a feature store or a run directory is missing or invalid."""

    exit_code = 1


# h5py and HDF5 put the errno inside their message: "... errno = 28, error message = 'No space left on device' ..."
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")
_WRITE_HINTS = {
    errno.ENOSPC: "free some space",
    getattr(errno, "EDQUOT", -1): "free some space (disk quota)",
    errno.EFBIG: "the file system or the file-size limit (ulimit -f) does not allow a file this large",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.EACCES: "check the folder's permissions or choose another --out",
    errno.EPERM: "check the folder's permissions or choose another --out",
}


def write_error(path: object, exc: BaseException, *, action: str = "write", then: str = "") -> DataError:
    """A one-line :class:`DataError` for a failed write of ``path``.

    Says why (the errno's text, also when h5py or torch only mention the errno inside a
    message of many lines), what to do about a full disk, a size limit or a read-only
    folder, and ``then`` (e.g. that the command resumes). ``action``: "write", "create", ...
    """
    inner = exc.__cause__ or exc.__context__  # torch.save to a file object: RuntimeError from the OSError
    if not isinstance(getattr(exc, "errno", None), int) and isinstance(getattr(inner, "errno", None), int):
        exc = inner
    code = getattr(exc, "errno", None)
    if not isinstance(code, int):
        found = _ERRNO_IN_TEXT.search(str(exc))
        code = int(found.group(1)) if found else None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = os.strerror(code) if code else (lines[0] if lines else type(exc).__name__)
    parts = [f"cannot {action} {path}: {reason}", _WRITE_HINTS.get(code, ""), then]
    return DataError("; ".join(p for p in parts if p))
