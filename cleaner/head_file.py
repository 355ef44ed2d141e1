"""``head.pt``: a trained cleaner + classifier and what it was trained on; the one reader and writer.

``mcpipe train-head`` writes it (:func:`save_head`); ``mcpipe finetune --head``
reads it (:func:`load_head`) and checks the backbone and classes against its own.
The file is a ``torch.save`` dict: ``format`` ("mcpipe-head"), ``version``,
``state_dict``, ``head`` (the constructor arguments of :class:`Head`),
``classes``, ``feature_dim``, ``provenance`` (the feature store's backbone,
weights and preprocessing) and ``config`` (the run's TOML).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mcpipe.atomic import save_atomic
from mcpipe.cleaner.model import Head
from mcpipe.errors import DataError
from mcpipe.loading import load_problem, load_state_checked

FORMAT = "mcpipe-head"
VERSION = 1
_KEYS = {"state_dict", "head", "classes", "feature_dim"}


@dataclass(frozen=True)
class SavedHead:
    head: Head
    classes: list[str]
    feature_dim: int
    provenance: dict


def save_head(path: Path, head: Head, *, classes: list[str], feature_dim: int, provenance: dict,
              config: str) -> None:
    """Write ``head`` atomically (a failed write keeps the previous file)."""
    save_atomic({"format": FORMAT, "version": VERSION, "state_dict": head.state_dict(), "head": head.config(),
                 "classes": list(classes), "feature_dim": feature_dim, "provenance": provenance,
                 "config": config}, path)


def load_head(run: Path, *, what: str = "--head") -> SavedHead:
    """The head of a train-head run folder (or of a head.pt itself), on the CPU; one-line DataErrors for a
    missing, unreadable, foreign or inconsistent file."""
    path = run / "head.pt" if run.is_dir() else run
    if not path.is_file():
        raise DataError(f"{what} {run}: no head.pt (mcpipe train-head --out writes one)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled objects weights_only refuses
        raise DataError(f"{what} {path} cannot be read as an mcpipe head: {load_problem(exc)}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or not _KEYS <= saved.keys():
        raise DataError(f"{what} {path} is not an mcpipe head (mcpipe train-head writes head.pt)")
    if saved.get("version", VERSION) != VERSION:
        raise DataError(f"{what} {path} is a head of format version {saved.get('version')}, this mcpipe reads "
                        f"version {VERSION}: train the head again with this mcpipe")
    try:
        head = Head(**saved["head"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} {path} holds an invalid head description: {exc}") from None
    load_state_checked(head, saved["state_dict"], what=f"{what} {path}")
    return SavedHead(head, list(saved["classes"]), int(saved["feature_dim"]), dict(saved.get("provenance") or {}))
