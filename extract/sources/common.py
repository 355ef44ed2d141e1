"""Helpers shared by the sources: the data root, text files read line by line,
relative paths checked, and the error for a split a source does not have."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.errors import DataError


def data_root(cfg: DataConfig) -> Path:
    """``cfg.root`` as a Path; DataError when it is not a folder."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder (expected a {cfg.source} data set there)")
    return root


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} {path} is missing")
    return path


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 text file, whitespace stripped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line:
            yield number, line


def expect_header(path: Path, lines: Iterator[tuple[int, str]], header: str) -> None:
    """Consume the first line of ``lines``; DataError unless it is ``header``."""
    first = next(lines, None)
    if first is None:
        raise DataError(f"{path} is empty: expected the header line {header!r}")
    if first[1] != header:
        raise DataError(f"{path} line {first[0]}: expected the header {header!r}, found {first[1]!r}")


def safe_relpath(text: str, *, where: str) -> str:
    """``text`` as a forward-slash path inside its root; DataError for an
    empty, absolute or escaping (``..``) path. ``where`` is "FILE line N"."""
    if not text:
        raise DataError(f"{where}: empty path, expected an image path relative to the data root")
    posix = PurePosixPath(text.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(text).drive:
        raise DataError(f"{where}: path {text!r} is absolute, expected a path relative to the data root")
    if ".." in posix.parts:
        raise DataError(f"{where}: path {text!r} leaves the data root ('..'), expected a path inside it")
    return posix.as_posix()


def no_split(source: str, split: str, available: list[str], where: Path) -> DataError:
    listed = ", ".join(available) if available else "none"
    return DataError(f"{source} has no split {split!r} under {where}; available splits: {listed}")


def int64(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)
