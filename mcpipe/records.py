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
from typing import Any, ClassVar

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
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _read(kind: type, value: Any, *, by_name: bool = False) -> Any:
    """A file's value as ``kind``'s record: one dict, a list of them, or (``by_name``) a dict of them; what is
    none of these is left as it is."""
    if by_name and isinstance(value, dict):
        return {k: kind.from_dict(v) if isinstance(v, dict) else v for k, v in value.items()}
    if isinstance(value, dict):
        return kind.from_dict(value)
    if isinstance(value, list):
        return [kind.from_dict(v) if isinstance(v, dict) else v for v in value]
    return value


class _Record:
    # fields holding records, read back from the file's dicts: one record or a list of them (``nested``), or a
    # dict of them by name (``nested_by_name``)
    nested: ClassVar[dict[str, type]] = {}
    nested_by_name: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        """As metrics.json holds it: fields in definition order, None left out (but for :func:`_always`
        fields), nested records as dicts."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None or f.metadata.get("always")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):  # noqa: ANN206
        """The record of a file's dict; keys it does not know (a newer mcpipe's) are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        for name, kind in cls.nested.items():
            if name in values:
                values[name] = _read(kind, values[name])
        for name, kind in cls.nested_by_name.items():
            if name in values:
                values[name] = _read(kind, values[name], by_name=True)
        return cls(**values)


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
class Detection(_Record):
    """How well a clean score finds the wrong labels among those whose truth is known
    (``mcpipe.cleaner.metrics.detection``): ``flipped`` (known wrong, the positive class) of ``known``."""

    auroc: float
    average_precision: float
    flipped: int
    known: int
    f1_at_estimate: float | None = None  # flagging as many as the run estimates wrong (its second round)


@dataclass
class LabelIssues(_Record):
    """The second round's flags (confident learning on the search's cross-validated probabilities); precision
    and recall where the truth is known."""

    flagged: int
    estimated_noise_rate: float
    precision: float | None = None
    recall: float | None = None


@dataclass
class HeadMetrics(_Record):
    """A train-head run's ``metrics.json``. ``detection``: per score (alpha, classifier, knn, cross_validated)
    how well it finds the wrong labels; ``search``: the automatic search's candidates (``Candidate.record()``
    of ``mcpipe.cleaner.auto``) and choice."""

    nested: ClassVar[dict[str, type]] = {"history": HeadEpoch, "noise": Noise, "label_issues": LabelIssues}
    nested_by_name: ClassVar[dict[str, type]] = {"detection": Detection}

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
    detection: dict[str, Detection] | None = None
    label_issues: LabelIssues | None = None
    noise_detection_auroc: float | None = None  # of the ranked_by score
    noise_detection_ap: float | None = None
    ranked_by: str | None = None
    seconds: float | None = None



@dataclass
class FinetuneMetrics(_Record):
    """A finetune run's ``metrics.json``: the history, the best epoch chosen on validation (never on test), and
    the exported model's test numbers. ``phases``: ``{"name", "epochs", "split"}`` per phase; ``start``: with
    ``--head``, the evaluation before any step (epoch 0)."""

    nested: ClassVar[dict[str, type]] = {"history": FinetuneEpoch, "noise": Noise, "start": FinetuneEpoch}

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
    try:
        return (FinetuneMetrics if "phases" in d else HeadMetrics).from_dict(d)
    except TypeError as exc:  # a record without a key it needs
        raise DataError(f"{path} is not a metrics.json written by mcpipe: {exc}") from None


def write_metrics(metrics: Metrics, path: Path) -> None:
    """``metrics`` as ``path`` (atomically: a reader sees the old file or the new one)."""
    write_json_atomic(metrics.to_dict(), path)

