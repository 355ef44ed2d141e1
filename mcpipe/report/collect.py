"""Read what the stages wrote: a head run, a finetune run, or a sweep of head runs.

Everything here reads files only; the figures are drawn elsewhere.
"""

from __future__ import annotations

import csv
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcpipe.errors import DataError
from mcpipe.records import HeadMetrics, Metrics, read_metrics
from mcpipe.rundir import read_confusion


@dataclass
class Run:
    """One run folder of ``mcpipe train-head`` ("head") or ``mcpipe finetune`` ("finetune")."""

    path: Path
    kind: str
    metrics: Metrics
    config: dict                     # the run's config.toml, parsed
    config_text: str
    confusion: tuple[np.ndarray, list[str]] | None
    scores: Path | None              # scores.csv (head runs)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def subset_size(self) -> int | None:
        return self.config.get("cleaner", {}).get("subset_size")

    @property
    def noise_rate(self) -> float | None:
        return None if self.metrics.noise is None else self.metrics.noise.rate

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics.test_accuracy

    @property
    def auroc(self) -> float | None:
        """Noise-detection AUROC of the score the run ranked by (train-head runs)."""
        return self.metrics.noise_detection_auroc if isinstance(self.metrics, HeadMetrics) else None


@dataclass
class Sweep:
    """A ``mcpipe sweep`` folder: the grid's keys and its finished runs, in grid order."""

    path: Path
    keys: list[str]
    runs: list[Run] = field(default_factory=list)
    config_text: str = ""


def _read_toml(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text), text
    except OSError:
        return {}, ""
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path} is not valid TOML: {exc}") from None


def is_sweep(path: Path) -> bool:
    return (path / "results.csv").is_file()


def read_run(path: Path) -> Run:
    """A finished (or interrupted, once it has metrics.json) head or finetune run."""
    if not path.is_dir():
        raise DataError(f"{path} is not a folder: give a run folder (train-head, finetune --out) or a sweep folder")
    if not (path / "metrics.json").is_file():
        raise DataError(f"{path} has no metrics.json: not a finished mcpipe run (train-head, sweep or finetune "
                        "write one when they end)")
    kind = "finetune" if (path / "model.json").is_file() or (path / "model.pt").is_file() else "head"
    metrics = read_metrics(path / "metrics.json")
    config, text = _read_toml(path / "config.toml")
    confusion = read_confusion(path / "confusion.csv") if (path / "confusion.csv").is_file() else None
    scores = path / "scores.csv" if (path / "scores.csv").is_file() else None
    return Run(path, kind, metrics, config, text, confusion, scores)


def read_sweep(path: Path) -> Sweep:
    """The sweep's runs named in ``results.csv`` (grid order: by folder name)."""
    try:
        with open(path / "results.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except OSError as exc:
        raise DataError(f"cannot read {path / 'results.csv'}: {exc.strerror or exc}") from None
    if "run" not in columns:
        raise DataError(f"{path / 'results.csv'} has no 'run' column: not written by mcpipe sweep")
    keys = columns[:columns.index("test_accuracy")] if "test_accuracy" in columns else []
    keys = [k for k in keys if k not in ("chosen", "val_accuracy")]  # the grid's keys only
    runs = [read_run(path / r["run"]) for r in sorted(rows, key=lambda r: r["run"])]
    _, text = _read_toml(path / "config.toml")
    return Sweep(path, keys, runs, text)


@dataclass(frozen=True)
class Scores:
    """scores.csv: one row per training image, most suspect first."""

    ids: list[str]
    given: list[str]
    predicted: list[str]
    clean: list[str]                 # "" where the true label is unknown
    known: np.ndarray                # (M,) bool: whether the given label is right is known
    wrong: np.ndarray                # (M,) bool: the given label is known wrong
    alpha: np.ndarray
    classifier: np.ndarray


def read_scores(path: Path) -> Scores:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        given = [r["given_label"] for r in rows]
        clean = [r["clean_label"] for r in rows]
        if rows and "given_label_correct" in rows[0]:  # also holds human checks where the true label is unknown
            status = np.array([r["given_label_correct"] for r in rows])
            known, wrong = status != "", status == "0"
        else:  # written before mcpipe kept that column
            known = np.array([c != "" for c in clean], dtype=bool)
            wrong = known & np.array([g != c for g, c in zip(given, clean)], dtype=bool)
        return Scores([r["id"] for r in rows], given, [r["predicted_label"] for r in rows], clean, known, wrong,
                      np.array([float(r["alpha_score"]) for r in rows]),
                      np.array([float(r["classifier_score"]) for r in rows]))
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path} is not a scores.csv written by mcpipe train-head: {exc}") from None
