"""Paths read from users' files (manifests, label tables): kept inside the folder they are relative to."""

from __future__ import annotations

from pathlib import Path

from mcpipe.errors import DataError


def safe_relpath(text: str, *, file: Path, line: int) -> str:
    """``text`` as a normalised forward-slash path inside its root; DataError
    naming ``file`` and ``line`` for an empty, absolute or escaping (``..``) path.

    Plain string work: it runs once per row of million-row manifests."""
    path = text.replace("\\", "/")
    parts = [p for p in path.split("/") if p and p != "."]
    if path.startswith("/") or path[1:2] == ":":
        problem = "is absolute, expected a path relative to the data root"
    elif ".." in parts:
        problem = "leaves the data root ('..'), expected a path inside it"
    elif not parts:
        problem = "is empty, expected an image path relative to the data root"
    else:
        return "/".join(parts)
    raise DataError(f"{file} line {line}: path {text!r} {problem}")
