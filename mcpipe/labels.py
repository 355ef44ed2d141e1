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


def delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


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
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = list(csv.reader(f, delimiter=delimiter(path)))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a readable UTF-8 {'TSV' if delimiter(path) == chr(9) else 'CSV'} "
                        f"table: {exc}") from None
    header = [h.strip() for h in table[0]] if table else []
    id_col = "id" if "id" in header else "path" if "path" in header else None
    if id_col is None or "label" not in header:
        need = ", ".join(c for c, ok in (("id", id_col), ("label", "label" in header)) if not ok)
        raise DataError(f"{path} line 1: header lacks the column(s) {need}; expected id, label and optionally "
                        f"clean_label, found {header}")
    i_col, l_col = header.index(id_col), header.index("label")
    c_col = header.index("clean_label") if "clean_label" in header else None
    may_drop = DROP_MARKER in header
    lookup = {name: k for k, name in enumerate(classes)}
    row_of = {x: r for r, x in enumerate(ids)}
    labels = np.full(len(ids), UNKNOWN, dtype=np.int64)
    clean = np.full(len(ids), UNKNOWN, dtype=np.int64) if c_col is not None else None
    seen = np.zeros(len(ids), dtype=bool)
    problems: dict[str, list[str]] = {}
    width = max(i_col, l_col, c_col or 0) + 1
    for line, row in enumerate(table[1:], start=2):
        if not "".join(row).strip():
            continue
        if len(row) < width:
            problems.setdefault(f"fewer than {width} fields", []).append(f"line {line}")
            continue
        key, label = row[i_col].strip(), row[l_col].strip()
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
        if clean is not None and row[c_col].strip():
            name = row[c_col].strip()
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
