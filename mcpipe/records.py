"""The rows of ``metrics.json``'s ``history``, one definition each, and the file's format version.

train-head and finetune write their own keys (``test_accuracy`` vs ``test_top1``: the files keep them), so
there is one record per stage, :class:`HeadEpoch` and :class:`FinetuneEpoch`; both answer the questions the
report asks (``val_top1``, ``test_top1``, ...) through :class:`Epoch`. :func:`read_history` turns a file's
rows back into records, so nothing else needs to know which stage wrote a key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

METRICS_FORMAT = 1  # metrics.json's "format_version"; a reader may refuse another


def stamped(metrics: dict) -> dict:
    """``metrics`` with its format version first (what every metrics.json holds)."""
    return {"format_version": METRICS_FORMAT, **{k: v for k, v in metrics.items() if k != "format_version"}}


class Epoch:
    """What a history row says, whichever stage wrote it (None: not measured)."""

    epoch: int
    loss: float | None

    @property
    def val_top1(self) -> float | None:
        raise NotImplementedError

    @property
    def test_top1(self) -> float | None:
        raise NotImplementedError

    val_clean_top1: float | None = None
    test_top5: float | None = None
    phase: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as metrics.json holds it: unmeasured (None) keys left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}  # type: ignore[call-overload]


@dataclass
class HeadEpoch(Epoch):
    """A train-head epoch: accuracies against the validation rows' given labels and the test split."""

    epoch: int
    loss: float | None = None
    lr: float | None = None
    images_per_second: float | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None

    @property
    def val_top1(self) -> float | None:
        return self.val_accuracy

    @property
    def test_top1(self) -> float | None:
        return self.test_accuracy


@dataclass
class FinetuneEpoch(Epoch):
    """A finetune epoch (or the ``start`` evaluation, epoch 0): training numbers and the evaluations, cleaner
    removed, on validation (given and clean labels) and test."""

    epoch: int
    phase: str | None = None
    loss: float | None = None
    lr: float | None = None
    backbone_lr: float | None = None
    backbone_trained: bool | None = None
    images_per_second: float | None = None
    val_top1: float | None = None  # type: ignore[assignment]
    val_images: int | None = None
    val_top5: float | None = None
    val_clean_top1: float | None = None
    val_clean_images: int | None = None
    test_top1: float | None = None  # type: ignore[assignment]
    test_images: int | None = None
    test_top5: float | None = None
    seconds: float | None = None


def read_history(rows: list[dict]) -> list[Epoch]:
    """metrics.json's history rows as records: finetune's (keys ``*_top1`` or ``phase``) or train-head's.
    Keys a record does not know (a newer mcpipe's) are ignored."""
    out: list[Epoch] = []
    for row in rows:
        kind = FinetuneEpoch if "phase" in row or any(k.endswith("_top1") for k in row) else HeadEpoch
        known = {f.name for f in fields(kind)}
        out.append(kind(**{k: v for k, v in row.items() if k in known}))
    return out
