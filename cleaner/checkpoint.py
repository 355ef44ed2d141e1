"""``RUN/checkpoint.pt`` of ``mcpipe train-head``: the one reader and writer.

Two kinds, one file name: a fixed configuration's (``train.auto = false``) after
every epoch -- the head, optimizer, schedule, epoch and history -- and an
automatic run's, before its search (``search`` None: ``--resume`` works from the
start) and after it (the search's result, so a resume goes straight to the
refit). Written atomically (``mcpipe.atomic``); read with ``weights_only``
loading and refused with one line when it cannot be read, is not ours, or is of
another version. (Files of mcpipe versions before the ``format`` key are read
as version 1.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mcpipe.atomic import save_atomic
from mcpipe.cleaner.auto import Candidate, Search
from mcpipe.cleaner.model import Head
from mcpipe.errors import DataError
from mcpipe.loading import load_problem, load_state_checked
from mcpipe.records import HeadEpoch

FORMAT = "mcpipe-head-checkpoint"
VERSION = 1
_FIXED_KEYS = {"head", "optimizer", "scheduler", "epoch", "history", "config"}
_REFIT_HINT = "it was trained on other features; resume on the store it started from, or --overwrite"


def save_epoch(path: Path, head: Head, optimizer: torch.optim.Optimizer, scheduler, *, epoch: int,
               history: list[HeadEpoch], config: str) -> None:
    """A fixed configuration after ``epoch`` (0-based) is trained."""
    save_atomic({"format": FORMAT, "version": VERSION, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "history": [r.to_dict() for r in history],
                 "config": config}, path)


def save_search(path: Path, found: Search | None, *, config: str) -> None:
    """An automatic run before its search (``found`` None) or after it: plain tensors and lists."""
    state = None if found is None else {
        "candidates": [c.record() for c in found.candidates], "chosen": found.chosen,
        "head": found.head.state_dict(), "labels": torch.from_numpy(found.labels),
        "weights": torch.from_numpy(found.weights), "seconds": found.seconds,
        "probs": None if found.probs is None else torch.from_numpy(found.probs),
        "issues": None if found.issues is None else torch.from_numpy(found.issues),
        "gain": None if found.gain is None else torch.from_numpy(found.gain)}
    save_atomic({"format": FORMAT, "version": VERSION, "config": config, "search": state}, path)


def _read(path: Path, device: torch.device) -> dict:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled objects weights_only refuses
        raise DataError(f"--resume: {path} cannot be read: {load_problem(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format", FORMAT) != FORMAT:
        raise DataError(f"--resume: {path} is not an mcpipe train-head checkpoint")
    if ckpt.get("version", VERSION) != VERSION:
        raise DataError(f"--resume: {path} is a version-{ckpt['version']} train-head checkpoint; this mcpipe reads "
                        f"version {VERSION}: --overwrite to start again")
    return ckpt


def load_epoch(path: Path, device: torch.device, head: Head, optimizer,
               scheduler) -> tuple[list[HeadEpoch], int]:
    """A fixed configuration's checkpoint loaded into ``head``, ``optimizer`` and ``scheduler``; -> (history,
    next epoch). Refused: unreadable, not ours, or a head that does not fit these features."""
    ckpt = _read(path, device)
    if not _FIXED_KEYS <= ckpt.keys():
        raise DataError(f"--resume: {path} is not an mcpipe train-head checkpoint "
                        f"(expected the keys {', '.join(sorted(_FIXED_KEYS))})")
    load_state_checked(head, ckpt["head"], what=f"--resume: {path}", hint=_REFIT_HINT)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return [HeadEpoch.from_dict(r) for r in ckpt["history"]], ckpt["epoch"] + 1


def load_search(path: Path, device: torch.device, new_head: Callable[[int], Head]) -> Search | None:
    """An automatic run's finished search, or None when it stopped before the search ended; ``new_head(N)``
    builds an untrained head with N images per subset for the chosen candidate's weights."""
    ckpt = _read(path, device)
    if "search" not in ckpt:
        raise DataError(f"--resume: {path} is not an mcpipe train-head checkpoint of an automatic run "
                        "(train.auto; expected the key search)")
    state = ckpt["search"]
    if state is None:
        return None
    candidates = [Candidate(**c) for c in state["candidates"]]
    head = new_head(candidates[state["chosen"]].subset_size)
    load_state_checked(head, state["head"], what=f"--resume: {path}", hint=_REFIT_HINT)
    as_np = lambda t: None if t is None else t.cpu().numpy()  # noqa: E731
    return Search(candidates, state["chosen"], head, as_np(state["labels"]), as_np(state["weights"]),
                  as_np(state["probs"]), as_np(state["issues"]), as_np(state["gain"]), state["seconds"])
