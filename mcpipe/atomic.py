"""Atomic file writes: a reader (or a run resumed after ``kill -9``) sees the old file or the new one, never half.

Every writer of a whole file writes through :func:`replacing`: the content goes
to a hidden temporary name beside the target (``.NAME.tmp-PID``, see
:data:`STALE`), is flushed to disk, and is renamed over the target; on any
failure the temporary is removed and the target is untouched. A killed writer
can leave a temporary behind; run folders remove them when a run starts
(``mcpipe.rundir``).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mcpipe.errors import write_error

STALE = ".*.tmp-*"  # what temporary names look like (glob)
KEPT = "the previous version, if any, is kept"


def temporary(path: Path) -> Path:
    """The name ``path`` is written under before the rename (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield the temporary name to write ``path``'s new content to; on leaving the block it is synced and
    renamed over ``path``; if the block (or the rename) fails, the temporary is removed and the error goes on."""
    tmp = temporary(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` atomically; a failed write is a one-line DataError (the previous file is kept)."""
    import torch  # (here: the JSON and text writers serve light commands too)

    try:
        with replacing(path) as tmp, open(tmp, "wb") as f:  # a file object: a failed write is an OSError
            torch.save(obj, f)
    except (OSError, RuntimeError) as exc:  # torch reports some failed writes as RuntimeError
        raise write_error(path, exc, then=KEPT) from None


def write_text_atomic(text: str, path: Path, *, then: str = KEPT) -> None:
    """UTF-8 text, written atomically; a failed write is a one-line DataError (the previous file is kept),
    ending with ``then``."""
    try:
        with replacing(path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
    except OSError as exc:
        raise write_error(path, exc, then=then) from None


def write_json_atomic(obj: dict, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2), path)
