"""``mcpipe clean``: a head run's verdict as a label file other training code can read.

One row per training image of the run (``scores.csv``), in the columns
cleanlab's users know: ``id``, ``given_label``, ``suggested_label`` (the
head's prediction), ``label_score`` (the head's probability of the given
label: out-of-sample ``cross_validated_score`` when the run has it, else
``classifier_score``), ``is_label_issue``, and ``label``, the label to train
with next:

* ``keep``: the given label;
* ``relabel``: the suggested label for the flagged rows, else the given one;
* ``drop``: flagged rows get an empty ``label`` (pandas reads it as NaN:
  ``df.dropna(subset=["label"])`` is the cleaned set); the row stays, so the
  file still covers every training image, as ``--labels`` requires.

The flagged rows are the ``fraction`` with the lowest ``label_score``; by
default ``fraction`` is the run's own estimate of the noise rate
(``label_issues.estimated_noise_rate`` in ``metrics.json``, written by the
default ``train.auto`` search's second round). Rows the run itself was told
to drop (a label file with empty labels: ``split`` = dropped in scores.csv)
stay dropped and are not counted. The format is :mod:`mcpipe.labels`'s.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcpipe.errors import ConfigError, DataError
from mcpipe.labels import CLEAN_COLUMNS, delimiter
from mcpipe.records import read_metrics
from mcpipe.atomic import write_text_atomic

ACTIONS = ("keep", "relabel", "drop")
_NEEDED = ("id", "given_label", "predicted_label", "classifier_score")


@dataclass(frozen=True)
class Cleaned:
    rows: int
    flagged: int
    dropped: int
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
    """The run's estimated noise rate (the share of labels its second round flagged), if it made one."""
    try:
        issues = read_metrics(run / "metrics.json").label_issues
    except DataError:
        return None
    return None if issues is None else float(issues.estimated_noise_rate)


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
    was_dropped = np.array([r.get("split") == "dropped" for r in rows])
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
    candidates = np.flatnonzero(~was_dropped)
    flagged = np.zeros(len(rows), dtype=bool)
    k = min(len(candidates), int(math.floor(fraction * len(candidates) + 0.5)))
    flagged[candidates[np.argsort(score[candidates], kind="stable")[:k]]] = True
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter(out), lineterminator="\n")
    w.writerow(CLEAN_COLUMNS)
    for r, s, bad, gone in zip(rows, score, flagged, was_dropped):
        if gone or (bad and action == "drop"):
            label = ""
        else:
            label = r["predicted_label"] if bad and action == "relabel" else r["given_label"]
        w.writerow([r["id"], "" if gone else r["given_label"], r["predicted_label"], f"{s:.5f}", int(bad), label])
    write_text_atomic(buf.getvalue(), out)
    dropped = int(was_dropped.sum() + (flagged.sum() if action == "drop" else 0))
    return Cleaned(rows=len(rows), flagged=int(flagged.sum()), dropped=dropped, fraction=float(fraction),
                   fraction_from=source, score=key, path=out)
