"""The rows of ``metrics.json``'s ``history``, one definition each, and the file's format version.

train-head and finetune write their own keys (``test_accuracy`` vs ``test_top1``: the files keep them), so
there is one record per stage, :class:`HeadEpoch` and :class:`FinetuneEpoch`; both answer the questions the
report asks (``val_top1``, ``test_top1``, ...) as attributes of the same names (:data:`Epoch`).
:func:`read_history` turns a file's rows back into records, so nothing else needs to know which stage wrote a
key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

METRICS_FORMAT = 1  # metrics.json's "format_version"; a reader may refuse another


def stamped(metrics: dict) -> dict:
    """``metrics`` with its format version first (what every metrics.json holds)."""
    return {"format_version": METRICS_FORMAT, **{k: v for k, v in metrics.items() if k != "format_version"}}


class _Row:
    def to_dict(self) -> dict[str, Any]:
        """The row as metrics.json holds it: unmeasured (None) keys left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class HeadEpoch(_Row):
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
class FinetuneEpoch(_Row):
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


def read_history(rows: list[dict]) -> list[Epoch]:
    """metrics.json's history rows as records: finetune's (keys ``*_top1`` or ``phase``) or train-head's.
    Keys a record does not know (a newer mcpipe's) are ignored."""
    out: list[Epoch] = []
    for row in rows:
        kind = FinetuneEpoch if "phase" in row or any(k.endswith("_top1") for k in row) else HeadEpoch
        known = {f.name for f in fields(kind)}
        out.append(kind(**{k: v for k, v in row.items() if k in known}))
    return out
