"""WebDataset shards: ``.tar`` files of samples, the form img2dataset writes.

Three layouts of ``data.root``, one per data set (a mix is refused)::

    root/                          root/                        root/
      00000.tar   -> split train     train-00000.tar              train/00000.tar ...
      00001.tar                      train-00001.tar              test/00000.tar ...
      00000.parquet (ignored)        test-00000.tar               classes.txt (optional)
      classes.txt (optional)         classes.txt (optional)

* split folders: every sub-folder of ``root`` holding ``.tar`` files is a split;
* named shards: ``<split>.tar``, ``<split>-NNN.tar``, ``<split>_NNN.tar`` in ``root``;
* numbered shards (img2dataset's output folder): ``NNNNN.tar`` in ``root`` form ``train``.

A sample is the group of members sharing a key, WebDataset's convention: the
member name up to the first dot of its base name (``dir/000123.jpg`` and
``dir/000123.json`` are sample ``dir/000123``). The key is the image's id, so
keys must be unique within a split. Per sample:

* the image: one member with an image extension (``.jpg``, ``.png``, ``.webp``, ...);
* the label, the first of: ``.cls`` (a class index as text, as in WebDataset's
  ImageNet shards); a ``.json`` whose ``"label"``, ``"class"`` or ``"cls"`` is
  an integer (class index) or a string (class name) -- what img2dataset writes
  with ``--save_additional_columns '["label"]'``; ``.txt`` (a class name; note
  that img2dataset's ``.txt`` is the caption, which is why the json comes first);
* optionally the clean label the same way: ``.clean.cls``, json
  ``"clean_label"``, ``.clean.txt``; unknown otherwise.

Samples without an image (metadata only) or without a label are left out and
counted in a warning; a split left with no labelled image is refused. Classes:
``classes.txt`` in ``root`` (one name per line) fixes them, class indices
point into it; otherwise, as for manifests, integer labels make classes
``"0"``..``"max"`` and names their sorted union over every split.

Shards are read with the standard library's ``tarfile``, not the
``webdataset`` package: extraction needs random access by row (resume at any
block, DataLoader workers reading any row, the report and finetune reading
single images), and ``tarfile`` gives each member's data offset and size in
one pass over the headers; a row's image is then one seek and read (see
``members.py``). The ``webdataset`` package streams samples in order, which
would have to be replayed from a shard's start to reach a row. A shard's scan
(about a second per 10,000 samples) is kept on disk and reused while the shard
is unchanged, see ``tar_shards.py``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from mcpipe.config import DataConfig
from mcpipe.errors import DataError
from mcpipe.extract.sources.base import UNKNOWN, SplitIndex
from mcpipe.extract.sources.common import data_root, no_split
from mcpipe.extract.sources.manifest import CLASSES_FILE, classes_of, read_classes
from mcpipe.extract.sources.members import Members
from mcpipe.extract.sources.tar_shards import IMAGE_EXTENSIONS, INTEGER, Shard, read_shard

log = logging.getLogger(__name__)

NAME = "webdataset"
SPLIT_ORDER = ("train", "val", "test")
_NUMBERED = re.compile(r"(.+?)[-_.]?[0-9]+")


# --------------------------------------------------------------------------- layout


def shard_layout(root: Path) -> dict[str, list[Path]]:
    """split -> its shards (sorted by name); DataError for no shards or a mix of layouts."""
    entries = sorted((e for e in root.iterdir() if not e.name.startswith(".")), key=lambda e: e.name)
    top = [e for e in entries if e.suffix == ".tar" and e.is_file()]
    folders = {e.name: sorted(e.glob("*.tar")) for e in entries if e.is_dir()}
    folders = {name: shards for name, shards in folders.items() if shards}
    if top and folders:
        name = next(iter(folders))
        raise DataError(f"{root} has shards both in itself ({top[0].name}) and in split folders "
                        f"({name}/{folders[name][0].name}): keep one layout")
    if folders:
        return dict(sorted(folders.items(), key=lambda kv: _split_rank(kv[0])))
    if not top:
        compressed = [e.name for e in entries if e.name.endswith((".tar.gz", ".tgz", ".tar.zst", ".tar.bz2"))]
        hint = (f"; compressed shards ({compressed[0]}) are not read, random access needs plain .tar "
                "(img2dataset writes .tar)") if compressed else ""
        raise DataError(f"no .tar shards in {root} or in its sub-folders{hint}")
    numbered = [p for p in top if p.stem.isdigit()]
    if numbered and len(numbered) != len(top):
        named = next(p for p in top if not p.stem.isdigit())
        raise DataError(f"{root} mixes numbered shards ({numbered[0].name}, split train) with named ones "
                        f"({named.name}): name every shard <split>-NNNNN.tar or put each split's shards "
                        f"in {root}/<split>/")
    groups: dict[str, list[Path]] = {}
    for p in top:
        groups.setdefault(_split_of(p.stem), []).append(p)
    return dict(sorted(groups.items(), key=lambda kv: _split_rank(kv[0])))


def _split_of(stem: str) -> str:
    if stem.isdigit():
        return "train"
    m = _NUMBERED.fullmatch(stem)
    return m.group(1) if m else stem


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def list_splits(cfg: DataConfig) -> list[str]:
    return list(shard_layout(data_root(cfg)))


# --------------------------------------------------------------------------- a split


def load_split(cfg: DataConfig, split: str) -> SplitIndex:
    root = data_root(cfg)
    layout = shard_layout(root)
    if split not in layout:
        raise no_split(NAME, split, list(layout), root, needs=f"{split}/*.tar or {split}-NNNNN.tar")
    shards = [read_shard(p) for p in layout[split]]
    _report_left_out(split, shards)
    keys = [k for s in shards for k in s.keys]
    if not keys:
        raise DataError(_no_images(split, root, shards))
    _check_unique(shards, len(keys))
    classes, index_of = _class_lookup(root, layout, split, shards)
    members = Members(files=tuple(s.path for s in shards),
                      file=np.repeat(np.arange(len(shards), dtype=np.int32), [len(s.keys) for s in shards]),
                      offset=np.concatenate([s.offset for s in shards]),
                      size=np.concatenate([s.size for s in shards]))
    folder = layout[split][0].parent
    return SplitIndex(source=NAME, split=split, root=folder, ids=keys, labels=index_of("label", shards),
                      clean_labels=index_of("clean", shards), classes=classes, members=members)


def _report_left_out(split: str, shards: list[Shard]) -> None:
    no_image, no_label = sum(s.no_image for s in shards), sum(s.no_label for s in shards)
    if no_image:
        log.info("%s: %d samples without an image member were left out", split, no_image)
    if no_label:
        first = next(s for s in shards if s.no_label)
        log.warning("%s: %d images without a label (.cls, json label, .txt) were left out, e.g. %r in %s",
                    split, no_label, first.unlabelled, first.path)


def _no_images(split: str, root: Path, shards: list[Shard]) -> str:
    where = f"{NAME} split {split!r} under {root}"
    if any(s.no_label for s in shards):
        first = next(s for s in shards if s.no_label)
        return (f"{where}: none of its {sum(s.no_label for s in shards)} images has a label (e.g. "
                f"{first.unlabelled!r} in {first.path}); expected a .cls member, a json \"label\" "
                "(img2dataset: --save_additional_columns '[\"label\"]') or a .txt class name")
    return (f"{where}: its {len(shards)} shard(s) hold no image members "
            f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")


def _check_unique(shards: list[Shard], n: int) -> None:
    seen: dict[str, Path] = {}
    for s in shards:
        for k in s.keys:
            if k in seen:
                raise DataError(f"sample key {k!r} is in both {seen[k]} and {s.path}: keys are the images' "
                                "ids and must be unique within a split")
            seen[k] = s.path
    assert len(seen) == n


def _class_lookup(root: Path, layout: dict[str, list[Path]], split: str, shards: list[Shard]):
    """(classes, index_of) where ``index_of(column, shards)`` -> (N,) int64 class indices."""
    classes_file = root / CLASSES_FILE
    if classes_file.is_file():
        classes = read_classes(classes_file)
        by_name = {name: k for k, name in enumerate(classes)}
        return classes, lambda column, ss: _indices(column, ss, by_name, len(classes), classes_file)
    every = [read_shard(p) for s, paths in layout.items() if s != split for p in paths] + shards
    names = {x for s in every for x in (*s.labels, *s.clean) if x}
    integers = {x for x in names if INTEGER.fullmatch(x)}
    if integers and integers != names:
        raise _mixed_labels(every, integers, names - integers, root)
    classes, lookup = classes_of(names)
    if len(classes) > 1000 and len(classes) > sum(len(s.keys) for s in every) // 2:  # most names used once
        log.warning("%d classes for %s: are the labels captions? (.txt is img2dataset's caption; "
                    "put the class in the json's \"label\" or a .cls member)", len(classes), root)
    return classes, lambda column, ss: _indices(column, ss, lookup, len(classes), None)


def _indices(column: str, shards: list[Shard], lookup: dict[str, int], k: int, classes_file: Path | None):
    """Class indices of ``column`` ("label" or "clean") of ``shards``; DataError naming the sample
    for a label outside the classes."""
    out = np.full(sum(len(s.keys) for s in shards), UNKNOWN, dtype=np.int64)
    i = 0
    for s in shards:
        values, is_index = (s.labels, s.is_index) if column == "label" else (s.clean, s.clean_is_index)
        for j, value in enumerate(values):
            if value:
                c = int(value) if classes_file is not None and is_index[j] else lookup.get(value, -1)
                if not 0 <= c < k:
                    kind = "class index" if is_index[j] else "class"
                    listed = f"listed in {classes_file}" if classes_file else "found"
                    raise DataError(f"{s.path}: sample {s.keys[j]!r} has the {kind} {value!r}, not one of the "
                                    f"{k} classes {listed}")
                out[i + j] = c
        i += len(values)
    return out


def _mixed_labels(shards: list[Shard], integers: set[str], names: set[str], root: Path) -> DataError:
    """The error for labels that are partly class indices, partly names: it names a sample of the fewer kind."""
    odd = names if len(names) <= len(integers) else integers
    other = min(integers if odd is names else names)
    s, key, value = next((s, key, value) for s in shards
                         for key, value in zip(s.keys * 2, (*s.labels, *s.clean)) if value in odd)
    return DataError(f"{s.path}: sample {key!r} has the label {value!r} but other labels are like {other!r}: "
                     f"labels must be all class indices or all class names, or the names listed in "
                     f"{root / CLASSES_FILE}")
