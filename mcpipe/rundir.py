"""Run folders shared by train-head and finetune: refuse to clobber, resume only the same config, write atomically.

One process writes a run folder at a time: ``start_run_dir`` returns the lock on
``RUN/.lock`` (see ``mcpipe.locks``), to hold while writing: ``with
start_run_dir(...):`` releases it however the run ends (an error, a signal,
Ctrl-C); forked children (DataLoader workers) never hold it. Writes that fail (a
full disk, a read-only folder) are one-line DataErrors naming the file.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from mcpipe.atomic import STALE, write_text_atomic
from mcpipe.errors import ConfigError, DataError, write_error
from mcpipe.locks import OutputLock, acquire, refuse_if_locked

_WRITER = "mcpipe train-head, finetune or sweep"


RESUME_VALUES = ("no", "yes", "auto")


def resume_mode(value: str, out: Path) -> bool:
    """``--resume`` as given ("no", "yes" or "auto") -> whether to resume ``out``. "auto" resumes when ``out``
    holds a checkpoint (of another config that is then refused, as with a plain ``--resume``) and starts fresh
    when it holds none: a requeued job runs the same command every time."""
    if value not in RESUME_VALUES:
        raise ConfigError(f"--resume {value!r} is invalid: expected --resume alone or --resume auto")
    if value == "auto":
        return (out / "checkpoint.pt").is_file()
    return value == "yes"


def check_run_dir(out: Path, config_text: str, files: tuple[str, ...], *, resume: bool, overwrite: bool) -> None:
    """Refuse, touching nothing: a file as ``out``; ``--resume`` without a checkpoint or with another config;
    a folder already holding a run (any of ``files`` besides config.toml) without ``--overwrite``, or one that
    another process is writing."""
    refuse_if_locked(out / ".lock", what=f"run folder {out}", writer=_WRITER)
    _check(out, config_text, files, resume=resume, overwrite=overwrite)


def _check(out: Path, config_text: str, files: tuple[str, ...], *, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a run folder")
    if resume:
        if not (out / "checkpoint.pt").exists():
            raise DataError(f"--resume: {out} has no checkpoint.pt to resume from")
        saved = (out / "config.toml").read_text(encoding="utf-8") if (out / "config.toml").exists() else ""
        if saved != config_text:
            raise ConfigError(f"--resume: the config differs from the one {out} was started with "
                              f"({out / 'config.toml'}); resume with the same config, or --overwrite")
        return
    present = [f for f in files if (out / f).exists() and f != "config.toml"]
    if present and not overwrite:
        raise DataError(f"{out} already holds a run ({', '.join(present)}); --resume to continue it or "
                        "--overwrite to replace it")


def start_run_dir(out: Path, config_text: str, files: tuple[str, ...], *, resume: bool,
                  overwrite: bool) -> OutputLock:
    """Lock ``out`` and ``check_run_dir``, then (unless resuming) clear ``files`` and write ``config.toml``.

    Returns the lock, to hold while writing the run: ``with start_run_dir(...):`` (it goes with the process too)."""
    check_run_dir(out, config_text, files, resume=resume, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(f"run folder {out}", exc, action="create") from None
    lock = acquire(out / ".lock", what=f"run folder {out}", writer=_WRITER)
    try:
        _check(out, config_text, files, resume=resume, overwrite=overwrite)  # again, now that it is ours
        for stale in out.glob(STALE):  # temporary files of a writer that was killed
            stale.unlink(missing_ok=True)
        if not resume:
            for name in files:
                (out / name).unlink(missing_ok=True)
            write_text_atomic(config_text, out / "config.toml")
    except OSError as exc:
        lock.release()
        raise write_error(f"run folder {out}", exc) from None
    except BaseException:
        lock.release()
        raise
    return lock


def write_confusion(counts: np.ndarray, classes: list[str], path: Path) -> None:
    """A (C, C) confusion matrix as CSV (rows true class, columns predicted class), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, np.asarray(counts)):
        w.writerow([name, *(int(v) for v in row)])
    write_text_atomic(buf.getvalue(), path)


def read_confusion(path: Path) -> tuple[np.ndarray, list[str]]:
    """What :func:`write_confusion` wrote: ((C, C) int64 counts, class names)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        classes = rows[0][1:]
        counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64)
    except (OSError, IndexError, ValueError) as exc:
        raise DataError(f"{path} is not a confusion matrix written by mcpipe: {exc}") from None
    if counts.shape != (len(classes), len(classes)):
        raise DataError(f"{path} is not a confusion matrix written by mcpipe: shape {counts.shape} "
                        f"for {len(classes)} classes")
    return counts, classes
