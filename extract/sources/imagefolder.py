"""A folder per class, the torchvision ``ImageFolder`` convention.

One split (root itself is ``train``)::

    root/
        cat/001.jpg
        cat/nested/002.png      # sub-folders of a class are walked too
        dog/003.jpeg

or split folders, each in that layout::

    root/
        train/cat/001.jpg  train/dog/...
        val/cat/...
        test/cat/...  test/dog/...

A root holding a ``train``, ``val`` or ``test`` folder is read as split
folders (so in a one-split root no class may have those names). Classes are
the sorted class-folder names (with split folders: the union over the splits,
the same list for every split). Images are files with the extensions of
``mcpipe.extract.images.IMAGE_SUFFIXES`` (any case); hidden files and folders are skipped. Ids
are paths relative to the split's folder.

Clean labels: a folder data set carries no verification, so ``train`` has
none (all ``UNKNOWN``); ``val`` and ``test`` are evaluation sets and are taken
as clean (clean labels = labels).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.extract.images import IMAGE_SUFFIXES
from mcpipe.extract.sources.base import UNKNOWN, SplitIndex
from mcpipe.extract.sources.common import data_root, int64, no_split

log = logging.getLogger(__name__)

NAME = "imagefolder"
SPLIT_FOLDERS = ("train", "val", "test")
CLEAN_SPLITS = ("val", "test")


def _subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _has_split_folders(root: Path) -> bool:
    return any((root / name).is_dir() for name in SPLIT_FOLDERS)


def _split_folder(root: Path, split: str) -> Path:
    return root / split if _has_split_folders(root) else root


def list_splits(cfg: DataConfig) -> list[str]:
    root = data_root(cfg)
    if not _has_split_folders(root):
        return ["train"]
    return [name for name in SPLIT_FOLDERS if (root / name).is_dir()]


def list_images(folder: Path) -> list[str]:
    """Image paths under ``folder`` relative to it, in torchvision's order
    (folders sorted, then file names sorted); hidden entries skipped."""
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder).replace(os.sep, "/")
        rel = "" if rel == "." else rel
        found += [(rel, f) for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    found.sort()
    return [f"{rel}/{f}" if rel else f for rel, f in found]


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    available = list_splits(cfg)
    root = data_root(cfg)
    if split not in available:
        raise no_split(NAME, split, available, root)
    folder = _split_folder(root, split)
    if folder == root:
        classes = _subfolders(root)
    else:
        classes = sorted(set().union(*(_subfolders(root / s) for s in available)))
        ignored = sorted(set(_subfolders(root)) - set(SPLIT_FOLDERS))
        if ignored:
            log.warning("%s: folders beside the split folders are ignored: %s", root, ", ".join(ignored))

    ids: list[str] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue  # a class that only other splits have
        files = list_images(folder / name)
        ids += [f"{name}/{f}" for f in files]
        labels += [k] * len(files)

    labels_arr = int64(labels)
    clean = labels_arr.copy() if split in CLEAN_SPLITS else np.full(len(ids), UNKNOWN, dtype=np.int64)
    return SplitIndex(source=NAME, split=split, root=folder, ids=ids, labels=labels_arr,
                      clean_labels=clean, classes=classes)
