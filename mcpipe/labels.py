"""Label files: a training split's labels from a CSV/TSV instead of the store or the data set.

::

    id,label,clean_label
    cat/001.jpg,cat,
    cat/002.jpg,dog,cat
    cat/003.jpg,,

Columns, by name in the header row (any order, others ignored): ``id`` (or
``path``, a manifest's column) matched to the training split's ids; ``label``,
a class name of the store, the label to train with; optionally
``clean_label``, the true class where known (empty = unknown), which then
replaces the split's known clean labels. ``.tsv`` files are tab-separated,
anything else comma-separated.

Every training id must be listed exactly once and nothing else may be. An
empty ``label`` leaves that image out of training; it is accepted only in a
file with a ``given_label`` column (the files ``mcpipe clean --action drop``
writes), so an empty cell in a hand-made file is refused as the mistake it
usually is. This module owns the format: ``mcpipe clean`` writes its columns
(:data:`CLEAN_COLUMNS`) and every stage reads label files through
:func:`read_label_file`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcpipe.errors import DataError
from mcpipe.hashing import sha256_file

UNKNOWN = -1  # clean label not known; also the label of a dropped row
CLEAN_COLUMNS = ("id", "given_label", "suggested_label", "label_score", "is_label_issue", "label")
DROP_MARKER = "given_label"  # a file with this column may leave `label` empty to drop the row


def delimiter(path: Path, header: str = "") -> str:
    """Tab for ``.tsv``/``.tab``, comma for ``.csv``; otherwise tab when the header line has tabs and no comma."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    return "\t" if "\t" in header and "," not in header else ","


@dataclass(frozen=True)
class Table:
    """A CSV/TSV table as text, the one reader of every label table mcpipe takes (label files, manifests,
    ``mcpipe import``'s labels): the header's columns, each non-blank data row's cells (stripped, at least as
    many as the columns the caller needs) and its line number."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]

    def column(self, name: str) -> int | None:
        return self.header.index(name) if name in self.header else None

    def values(self, name: str) -> list[str]:
        """Column ``name`` of every row ("" for a row too short to have it, or a column the table lacks)."""
        k = self.column(name)
        return [row[k] if k is not None and k < len(row) else "" for row in self.rows]


def read_table(path: str | Path, need: tuple[str | tuple[str, ...], ...], *, expected: str,
               optional: tuple[str, ...] = (), what: str = "file") -> Table:
    """Read a CSV/TSV whose header names the columns ``need`` (each a name or a tuple of alternatives);
    every row must have a cell for those and for the ``optional`` columns the header has.

    Raises ``DataError`` with one line: the file is missing (``"<what> <path> does not exist"``), not UTF-8
    text or not a valid table, its header lacks a needed column (``expected`` says what a header holds), or a
    row has fewer fields than the needed columns ask for (line number given). Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            reader = csv.reader(f, delimiter=delimiter(path, first))
            header = [h.strip() for h in next(reader, [])]
            missing = [alts if isinstance(alts, str) else alts[0] for alts in need
                       if not any(a in header for a in ((alts,) if isinstance(alts, str) else alts))]
            if missing:
                raise DataError(f"{path} line 1: header lacks the column(s) {', '.join(missing)}; expected "
                                f"{expected}, found {header}")
            named = [a for alts in need for a in ((alts,) if isinstance(alts, str) else alts)] + list(optional)
            width = 1 + max(header.index(a) for a in named if a in header)
            rows, lines = [], []
            for row in reader:
                if not "".join(row).strip():
                    continue  # a blank line
                if len(row) < width:
                    raise DataError(f"{path} line {reader.line_num}: {len(row)} fields, expected at least "
                                    f"{width} (header {header})")
                rows.append([cell.strip() for cell in row])
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as exc:
        kind = "TSV" if delimiter(path, "") == "\t" else "CSV"
        raise DataError(f"{path} is not a readable UTF-8 {kind} table: {exc}") from None
    return Table(path, header, rows, lines)


@dataclass(frozen=True)
class LabelFile:
    """A label file matched to a split's ids (arrays in the split's row order).

    Attributes:
        path: the file. sha256: of its bytes.
        labels: (M,) int64, the label to train with; ``UNKNOWN`` (-1) for a dropped row.
        clean_labels: (M,) int64 true labels (-1 unknown), or None when the file has no clean_label column.
    """

    path: Path
    sha256: str
    labels: np.ndarray
    clean_labels: np.ndarray | None

    @property
    def keep(self) -> np.ndarray:
        """(M,) bool: rows to train on (not dropped)."""
        return self.labels >= 0

    @property
    def dropped(self) -> int:
        return int((self.labels < 0).sum())

    def record(self, given_before: np.ndarray | None = None) -> dict:
        """What a run's ``metrics.json`` says about the file; ``given_before``: the labels it replaced."""
        out = {"file": str(self.path), "sha256": self.sha256, "rows": int(len(self.labels)),
               "dropped": self.dropped, "clean_labels": self.clean_labels is not None}
        if given_before is not None:
            out["changed"] = int(((self.labels != given_before) & self.keep).sum())
        return out


def _rows_message(path: Path, count: int, what: str, first: str) -> DataError:
    rows = "row has" if count == 1 else "rows have"
    return DataError(f"{path}: {count} {rows} {what} (first: {first})")


def read_label_file(path: str | Path, ids: list[str], classes: list[str], *, what: str = "the training split") \
        -> LabelFile:
    """Read ``path`` and match it to ``ids`` (see the module docstring).

    Raises ``DataError`` with one line naming the problem and how many rows have it: a missing file or
    column, an id listed twice, ids not in ``ids``, ids of ``ids`` not listed, labels that are not in
    ``classes``, or an empty label in a file that may not drop rows.
    """
    table = read_table(path, (("id", "path"), "label"), optional=("clean_label",), what="label file",
                       expected="id, label and optionally clean_label")
    path = table.path
    i_col = table.column("id") if "id" in table.header else table.column("path")
    l_col, c_col = table.column("label"), table.column("clean_label")
    may_drop = DROP_MARKER in table.header
    lookup = {name: k for k, name in enumerate(classes)}
    row_of = {x: r for r, x in enumerate(ids)}
    labels = np.full(len(ids), UNKNOWN, dtype=np.int64)
    clean = np.full(len(ids), UNKNOWN, dtype=np.int64) if c_col is not None else None
    seen = np.zeros(len(ids), dtype=bool)
    problems: dict[str, list[str]] = {}
    for line, row in zip(table.lines, table.rows):
        key, label = row[i_col], row[l_col]
        r = row_of.get(key)
        if r is None:
            problems.setdefault(f"an id that is not in {what}", []).append(f"line {line}, {key!r}")
            continue
        if seen[r]:
            problems.setdefault("an id listed before", []).append(f"line {line}, {key!r}")
            continue
        seen[r] = True
        if label:
            if label not in lookup:
                problems.setdefault(f"a label that is not one of the {len(classes)} classes", []).append(
                    f"line {line}, {label!r}")
                continue
            labels[r] = lookup[label]
        elif not may_drop:
            problems.setdefault("an empty label (only a file with a given_label column, as mcpipe clean "
                                "writes, may leave label empty to drop the row)", []).append(f"line {line}")
        if clean is not None and row[c_col]:
            name = row[c_col]
            if name not in lookup:
                problems.setdefault(f"a clean_label that is not one of the {len(classes)} classes", []).append(
                    f"line {line}, {name!r}")
                continue
            clean[r] = lookup[name]
    if problems:  # the first kind of problem met, with its count and first row
        problem, where = next(iter(problems.items()))
        raise _rows_message(path, len(where), problem, where[0])
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise DataError(f"{path} lists {int(seen.sum()):,} of the {len(ids):,} ids of {what}: {len(missing):,} "
                        f"missing (first: {ids[missing[0]]!r}); a label file must cover every training image")
    if not (labels >= 0).any():
        raise DataError(f"{path} drops every image: nothing is left to train on")
    return LabelFile(path=path, sha256=sha256_file(path), labels=labels, clean_labels=clean)


def labels_toml(file: str) -> str:
    """The ``[labels]`` table of a run's ``config.toml`` (with the file's sha256 as a comment, so resuming
    after the file changed is refused), or "" without a label file (config.toml as before label files)."""
    if not file:
        return ""
    path = Path(file)
    if not path.is_file():
        raise DataError(f"label file {path} does not exist")
    quoted = file.replace("\\", "\\\\").replace('"', '\\"')
    return f'[labels]\nfile = "{quoted}"\n# sha256 of the label file: {sha256_file(path)}\n\n'
