"""Helpers shared by the sources: the data root, text files read line by line,
relative paths checked, and the error for a split a source does not have."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.errors import DataError


def data_root(cfg: DataConfig) -> Path:
    """``cfg.root`` as a Path; DataError when it is not a folder."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder (data.source = {cfg.source!r} reads a folder)")
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


def no_split(source: str, split: str, available: list[str], where: Path, *, needs: str = "") -> DataError:
    """The error for a split that is not there; ``needs`` says which files make it."""
    listed = ", ".join(available) if available else "none"
    hint = f" ({split!r} needs {needs})" if needs else ""
    return DataError(f"{source} has no split {split!r} under {where}; available splits: {listed}{hint}")


def int64(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)
