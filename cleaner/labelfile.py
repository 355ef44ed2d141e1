"""``mcpipe clean``: a head run's verdict as a label file other training code can read.

One row per training image of the run (``scores.csv``), in the columns
cleanlab's users know: ``id``, ``given_label``, ``suggested_label`` (the
head's prediction), ``label_score`` (the head's probability of the given
label: out-of-sample ``cross_validated_score`` when the run has it, else
``classifier_score``), ``is_label_issue``, and ``label``, the label to train
with next:

* ``keep``: the given label;
* ``relabel``: the suggested label for the flagged rows, else the given one;
* ``drop``: flagged rows are left out of the file.

The flagged rows are the ``fraction`` with the lowest ``label_score``; by
default ``fraction`` is the run's own estimate of the noise rate
(``label_issues.estimated_noise_rate`` in ``metrics.json``, written by the
default ``train.auto`` search's second round).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcpipe.errors import ConfigError, DataError
from mcpipe.rundir import write_text_atomic

ACTIONS = ("keep", "relabel", "drop")
COLUMNS = ("id", "given_label", "suggested_label", "label_score", "is_label_issue", "label")
_NEEDED = ("id", "given_label", "predicted_label", "classifier_score")


@dataclass(frozen=True)
class Cleaned:
    rows: int
    flagged: int
    written: int
    fraction: float
    fraction_from: str
    score: str
    path: Path


def _read_scores(run: Path) -> list[dict]:
    path = run / "scores.csv" if run.is_dir() else run
    if not path.is_file():
        raise DataError(f"{run}: no scores.csv (mcpipe train-head --out writes one)")
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a CSV file ({exc})") from None
    missing = [c for c in _NEEDED if not rows or c not in rows[0]]
    if missing:
        raise DataError(f"{path} is not an mcpipe scores.csv: no column(s) {', '.join(missing)}")
    return rows


def _estimate(run: Path) -> float | None:
    path = run / "metrics.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        return float(m["label_issues"]["estimated_noise_rate"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clean(run: Path, out: Path, *, action: str = "keep", fraction: float | None = None,
          overwrite: bool = False) -> Cleaned:
    """Write ``out`` (CSV, or TSV for a .tsv name) from the head run ``run``; see the module docstring."""
    if action not in ACTIONS:
        raise ConfigError(f"--action {action!r} is invalid: expected one of {', '.join(ACTIONS)}")
    if fraction is not None and not 0 <= fraction < 1:
        raise ConfigError(f"--fraction {fraction} is invalid: expected a number in [0, 1)")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists; --overwrite to replace it")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as labels.csv")
    rows = _read_scores(run)
    source = "given"
    if fraction is None:
        fraction, source = _estimate(run), "the run's estimated noise rate"
        if fraction is None:
            raise DataError(f"{run}: metrics.json holds no estimate of the noise rate (the default train.auto "
                            "search writes one); give --fraction")
    use_cv = all(r.get("cross_validated_score") for r in rows)
    key = "cross_validated_score" if use_cv else "classifier_score"
    try:
        score = np.array([float(r[key]) for r in rows])
    except ValueError as exc:
        raise DataError(f"{run}: scores.csv has a {key} that is not a number ({exc})") from None
    flagged = np.zeros(len(rows), dtype=bool)
    k = min(len(rows), int(math.floor(fraction * len(rows) + 0.5)))
    flagged[np.argsort(score, kind="stable")[:k]] = True
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t" if out.suffix.lower() == ".tsv" else ",", lineterminator="\n")
    w.writerow(COLUMNS)
    written = 0
    for r, s, bad in zip(rows, score, flagged):
        if bad and action == "drop":
            continue
        label = r["predicted_label"] if bad and action == "relabel" else r["given_label"]
        w.writerow([r["id"], r["given_label"], r["predicted_label"], f"{s:.5f}", int(bad), label])
        written += 1
    write_text_atomic(buf.getvalue(), out)
    return Cleaned(rows=len(rows), flagged=int(flagged.sum()), written=written, fraction=float(fraction),
                   fraction_from=source, score=key, path=out)
