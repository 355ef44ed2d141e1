"""A table per split listing image paths and labels.

::

    root/
        train.csv          # or train.tsv: the split is the file name
        test.csv
        classes.txt        # optional: one class name per line, fixes the order
        images/...         # anywhere under root

Each table has a header row naming the columns ``path`` and ``label`` and
optionally ``clean_label`` (any order; other columns are ignored), e.g.::

    path,label,clean_label
    images/0001.jpg,cat,
    images/0002.jpg,dog,cat

A label file written by ``mcpipe clean`` is a manifest too: its ``id``
column (the image path, for file sources) stands for ``path``, and the rows
it drops (an empty ``label`` in a file with a ``given_label`` column) are
left out; so ``mcpipe clean RUN --out DATA/train.csv`` (with a
``classes.txt`` to keep the class order) makes a cleaned data set.

Paths are relative to ``root`` and may not leave it. Labels are class names.
Without ``classes.txt`` the classes are the sorted union of the labels and
clean labels of every table in ``root``; when all of them are integers
(``0``, ``7``, ...) they are indices and the classes are ``"0"`` ... ``"max"``.
A mix of integers and names (``0``, ``1``, ``2.5``) is refused as a typo: a
``classes.txt`` says which labels are class names.
An empty ``clean_label`` cell means unknown.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.errors import DataError
from mcpipe.extract.sources.base import UNKNOWN, SplitIndex
from mcpipe.extract.sources.common import data_root, no_split, read_lines
from mcpipe.labels import DROP_MARKER, read_table as read_label_table
from mcpipe.paths import safe_relpath

log = logging.getLogger(__name__)

NAME = "manifest"
SUFFIXES = (".csv", ".tsv")
CLASSES_FILE = "classes.txt"
_INTEGER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Table:
    """One parsed manifest file; ``clean`` holds "" where unknown."""

    path: Path
    ids: list[str]
    labels: list[str]
    clean: list[str]
    lines: list[int]


def manifest_files(root: Path) -> dict[str, Path]:
    """split name -> its table file; DataError when a split has both a .csv and a .tsv."""
    files: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if path.suffix.lower() not in SUFFIXES or path.name.startswith(".") or not path.is_file():
            continue
        if path.stem in files:
            raise DataError(f"split {path.stem!r} has two manifests, {files[path.stem]} and {path}: keep one")
        files[path.stem] = path
    return files


def list_splits(cfg: DataConfig) -> list[str]:
    return list(manifest_files(data_root(cfg)))


def read_table(path: Path) -> Table:
    """Parse one manifest (through :func:`mcpipe.labels.read_table`); DataError naming the file and line for
    anything malformed. A clean file's ``id`` stands for ``path``; its rows with an empty label are left out."""
    text = read_label_table(path, (("path", "id"), "label"), optional=("clean_label",),
                            expected="path, label and optionally clean_label")
    key = "path" if "path" in text.header else "id"  # mcpipe clean writes id
    may_drop, dropped = DROP_MARKER in text.header, 0
    ids, labels, clean, lines = [], [], [], []
    for line, p, label, c in zip(text.lines, text.values(key), text.values("label"), text.values("clean_label")):
        if not label:
            if may_drop:
                dropped += 1  # by mcpipe clean
                continue
            raise DataError(f"{path} line {line}: empty label, expected a class name")
        ids.append(safe_relpath(p, file=path, line=line))
        labels.append(label)
        clean.append(c)
        lines.append(line)
    if dropped:
        log.info("%s: %d rows with an empty label left out (dropped by mcpipe clean)", path, dropped)
    return Table(path, ids, labels, clean, lines)


def read_classes(path: Path) -> list[str]:
    classes = [line for _, line in read_lines(path)]
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise DataError(f"{path}: class {dup!r} is listed twice")
    return classes


def infer_classes(tables: list[Table]) -> tuple[list[str], dict[str, int]]:
    """(classes, label -> index): the sorted union of the labels, or, when every
    label is an integer, "0".."max" with each label its own index."""
    names = {x for t in tables for x in (*t.labels, *t.clean) if x}
    integers = {x for x in names if _INTEGER.fullmatch(x)}
    if integers and integers != names:
        raise _mixed_labels(tables, integers)
    return classes_of(names)


def classes_of(names: set[str]) -> tuple[list[str], dict[str, int]]:
    """(classes, label -> index) of labels that are all integers ("0".."max", each label its
    own index) or all class names (their sorted list); the caller has refused a mix."""
    if names and all(_INTEGER.fullmatch(x) for x in names):
        lookup = {x: int(x) for x in names}
        return [str(i) for i in range(max(lookup.values()) + 1)], lookup
    classes = sorted(names)
    return classes, {name: k for k, name in enumerate(classes)}


def _mixed_labels(tables: list[Table], integers: set[str]) -> DataError:
    """The error for labels that are partly integers, partly names: it names the first label of the fewer kind."""
    names = {x for t in tables for x in (*t.labels, *t.clean) if x} - integers
    odd_are_names = len(names) <= len(integers)
    example = min(integers if odd_are_names else names)
    for table in tables:
        for i, line in enumerate(table.lines):
            for column, value in (("label", table.labels[i]), ("clean_label", table.clean[i])):
                if value and (value in names) == odd_are_names:
                    kind, expected = (("is not an integer", "an integer class index") if odd_are_names else
                                      ("is an integer", "a class name"))
                    return DataError(f"{table.path} line {line}: {column} {value!r} {kind} but other labels are "
                                     f"like {example!r}; expected {expected}, or the class names listed in "
                                     f"{table.path.parent / CLASSES_FILE}")
    raise AssertionError("no mixed label found")


def _indices(table: Table, column: str, lookup: dict[str, int]) -> np.ndarray:
    """Class indices of a column (``UNKNOWN`` for an empty clean label); DataError
    naming the line for a name that is not in ``lookup``."""
    values = table.labels if column == "label" else table.clean
    out = np.full(len(values), UNKNOWN, dtype=np.int64)
    for i, name in enumerate(values):
        if not name:
            continue
        k = lookup.get(name)
        if k is None:
            raise DataError(f"{table.path} line {table.lines[i]}: {column} {name!r} is not one of the "
                            f"{len(lookup)} classes listed in {table.path.parent / CLASSES_FILE}")
        out[i] = k
    return out


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    root = data_root(cfg)
    files = manifest_files(root)
    if split not in files:
        raise no_split(NAME, split, list(files), root, needs=f"{split}.csv or {split}.tsv")
    table = read_table(files[split])
    if (root / CLASSES_FILE).is_file():
        classes = read_classes(root / CLASSES_FILE)
        lookup = {name: k for k, name in enumerate(classes)}
    else:
        classes, lookup = infer_classes([table if s == split else read_table(p) for s, p in files.items()])
    return SplitIndex(source=NAME, split=split, root=root, ids=table.ids,
                      labels=_indices(table, "label", lookup),
                      clean_labels=_indices(table, "clean_label", lookup), classes=classes)
