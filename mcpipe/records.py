"""What ``metrics.json`` holds, one definition each: the file of a train-head run (:class:`HeadMetrics`) or of a
finetune run (:class:`FinetuneMetrics`), their per-epoch history rows, and the file's format version.

train-head and finetune write their own keys (``test_accuracy`` vs ``test_top1`` in a history row: the files
keep them), so there is one record per stage, :class:`HeadEpoch` and :class:`FinetuneEpoch`; both answer the
questions the report asks (``val_top1``, ``test_top1``, ...) as attributes of the same names (:data:`Epoch`).
:func:`read_metrics` is the one reader (refusing a newer format with one line) and :func:`write_metrics` the
one writer, so nothing else needs to know which stage wrote a key. A record written out keeps the keys of the
files mcpipe wrote before these records existed: fields in definition order, unmeasured ones (None) left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mcpipe.atomic import write_json_atomic
from mcpipe.errors import DataError

METRICS_FORMAT = 1  # metrics.json's "format_version"; a reader refuses a newer one


def _always() -> Any:
    """A field written even when it is None (``null``): a key every file of the stage has."""
    return field(default=None, metadata={"always": True})


def _plain(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """As metrics.json holds it: fields in definition order, None left out (but for :func:`_always`
        fields), nested records as dicts."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None or f.metadata.get("always")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):  # noqa: ANN206
        """The record of a file's dict; keys it does not know (a newer mcpipe's) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class HeadEpoch(_Record):
    """A train-head epoch: accuracies against the validation rows' given labels and the test split."""

    epoch: int
    loss: float | None = None
    lr: float | None = None
    images_per_second: float | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    # what the report asks of every row: train-head measures no top-5 nor clean-label validation, has no phases
    val_clean_top1 = test_top5 = phase = None

    @property
    def val_top1(self) -> float | None:
        return self.val_accuracy

    @property
    def test_top1(self) -> float | None:
        return self.test_accuracy


@dataclass
class FinetuneEpoch(_Record):
    """A finetune epoch (or the ``start`` evaluation, epoch 0): training numbers and the evaluations, cleaner
    removed, on validation (given and clean labels) and test."""

    epoch: int
    phase: str | None = None
    loss: float | None = None
    lr: float | None = None
    backbone_lr: float | None = None
    backbone_trained: bool | None = None
    images_per_second: float | None = None
    val_top1: float | None = None
    val_images: int | None = None
    val_top5: float | None = None
    val_clean_top1: float | None = None
    val_clean_images: int | None = None
    test_top1: float | None = None
    test_images: int | None = None
    test_top5: float | None = None
    seconds: float | None = None


Epoch = HeadEpoch | FinetuneEpoch  # a history row, either stage's: both answer epoch, loss, val_top1,
# val_clean_top1, test_top1, test_top5 and phase


@dataclass
class Noise(_Record):
    """The label noise a run trained with: ``[noise]`` as configured and the share of labels it changed."""

    kind: str
    rate: float
    realized_rate: float


@dataclass
class HeadMetrics(_Record):
    """A train-head run's ``metrics.json``. ``detection``: per score (alpha, classifier, knn, cross_validated)
    the noise-detection numbers of ``mcpipe.cleaner.metrics.detection``; ``search``: the automatic search's
    candidates and choice; ``label_issues``: the second round's flags (``flagged``, ``estimated_noise_rate``,
    precision and recall where the truth is known)."""

    format_version: int = METRICS_FORMAT
    history: list[HeadEpoch] = field(default_factory=list)
    train_images: int | None = None
    subset_size: int | None = None
    noise: Noise | None = None
    features: str | None = None  # the feature folder, absolute
    labels: dict | None = None  # the label file's record (labels.file)
    chosen_on: str | None = None  # "val" or "none"
    validation: dict | None = None  # {"source", "images"}
    search: dict | None = None
    best_epoch: int | None = None
    val_accuracy: float | None = None  # against the validation rows' given labels
    val_clean_accuracy: float | None = None  # against their clean labels, where known (reported only)
    test_accuracy: float | None = None
    test_accuracy_before_refit: float | None = None
    test_images: int | None = None
    set_accuracy: float | None = None
    detection: dict[str, dict] | None = None
    label_issues: dict | None = None
    noise_detection_auroc: float | None = None  # of the ranked_by score
    noise_detection_ap: float | None = None
    ranked_by: str | None = None
    seconds: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadMetrics":
        m = super().from_dict(d)
        m.history = [HeadEpoch.from_dict(r) for r in d.get("history") or []]
        m.noise = Noise.from_dict(m.noise) if isinstance(m.noise, dict) else None
        return m


@dataclass
class FinetuneMetrics(_Record):
    """A finetune run's ``metrics.json``: the history, the best epoch chosen on validation (never on test), and
    the exported model's test numbers. ``phases``: ``{"name", "epochs", "split"}`` per phase; ``start``: with
    ``--head``, the evaluation before any step (epoch 0)."""

    format_version: int = METRICS_FORMAT
    history: list[FinetuneEpoch] = field(default_factory=list)
    seconds: float | None = None
    train_images: int | None = None
    images_replaced: int | None = None
    phases: list[dict] = field(default_factory=list)
    noise: Noise | None = None
    val_images: int | None = None
    val_from: str | None = _always()  # the validation split (null without one)
    chosen_on: str | None = None  # "val" or "none"
    labels: dict | None = None  # the label file's record (labels.file)
    start: FinetuneEpoch | None = None
    best_epoch: int | None = None
    best_val_accuracy: float | None = None
    val_clean_accuracy_at_best_epoch: float | None = None
    test_accuracy_at_best_epoch: float | None = None
    exported_epoch: int | None = None
    test_accuracy: float | None = None  # the exported model's
    test_top5: float | None = None
    test_accuracy_last_epoch: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneMetrics":
        m = super().from_dict(d)
        m.history = [FinetuneEpoch.from_dict(r) for r in d.get("history") or []]
        m.noise = Noise.from_dict(m.noise) if isinstance(m.noise, dict) else None
        m.start = FinetuneEpoch.from_dict(m.start) if isinstance(m.start, dict) else None
        return m


Metrics = HeadMetrics | FinetuneMetrics


def read_metrics(path: Path) -> Metrics:
    """``path`` (a run's metrics.json) as its record: a finetune run's (it has ``phases``) or a train-head
    run's. Refused with one line (DataError): unreadable, not JSON, not mcpipe's, or a newer format version."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); was the run interrupted? rerun it with --resume") from None
    if not isinstance(d, dict) or not isinstance(d.get("history"), list):
        raise DataError(f"{path} has no training history: not written by mcpipe")
    version = d.get("format_version", METRICS_FORMAT)  # (files before the version key: 1)
    if not isinstance(version, int) or version > METRICS_FORMAT:
        raise DataError(f"{path} has format version {version}, this mcpipe reads {METRICS_FORMAT}: use the "
                        "mcpipe that wrote it")
    return (FinetuneMetrics if "phases" in d else HeadMetrics).from_dict(d)


def write_metrics(metrics: Metrics, path: Path) -> None:
    """``metrics`` as ``path`` (atomically: a reader sees the old file or the new one)."""
    write_json_atomic(metrics.to_dict(), path)
