"""One WebDataset shard read with the standard library's ``tarfile``: its labelled images and where their
bytes are, scanned once and kept.

Samples, images and labels are as ``webdataset.py`` describes: members grouped by key (the name up to
the first dot of the base name), one image member, the label from ``.cls``, the json or ``.txt``.

Scanning reads every member header (``tarfile``, one pass) and the label members; a shard of 10,000
img2dataset samples (30,000 members) takes about a second. The result is kept for the process and on
disk, in ``$XDG_CACHE_HOME/mcpipe/webdataset`` (``~/.cache/...``), one JSON file per shard named by a hash
of its absolute path, size, modification time and inode; a shard that changes gets a new entry, an entry
that cannot be read or written is ignored (the shard is scanned again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mcpipe.errors import DataError
from mcpipe.extract.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(suffix[1:] for suffix in IMAGE_SUFFIXES)  # member names end ".<ext>"
JSON_LABEL_KEYS = ("label", "class", "cls")
JSON_CLEAN_KEY = "clean_label"
INTEGER = re.compile(r"[0-9]+")
CACHE_VERSION = 1

Members_ = dict[str, tuple[int, int]]  # extension -> (data offset, size)


@dataclass(frozen=True, eq=False)
class Shard:
    """The labelled images of one shard, in tar order.

    ``labels[i]`` is a class index as text where ``is_index[i]`` (from ``.cls`` or a json
    integer), else a class name; ``clean`` likewise, "" where unknown.
    """

    path: Path
    keys: list[str]
    offset: np.ndarray
    size: np.ndarray
    labels: list[str]
    is_index: np.ndarray
    clean: list[str]
    clean_is_index: np.ndarray
    no_image: int = 0       # samples without an image member, left out
    no_label: int = 0       # images without a label, left out
    unlabelled: str = ""    # the first of those, for the warning


_SCANS: dict[str, Shard] = {}  # this process's scans, by cache key


def read_shard(path: Path) -> Shard:
    """The labelled images of shard ``path``, from this process's memory, the disk cache or a scan;
    DataError naming the shard when it cannot be read or is not a readable tar."""
    try:
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{CACHE_VERSION}"
                             .encode()).hexdigest()[:32]
        shard = _SCANS.get(key) or _load_cached(key, path)
        if shard is None:
            with open(path, "rb") as f:
                shard = _scan(f, path)
            _save_cached(key, shard)
    except OSError as exc:
        raise DataError(f"cannot read the shard {path}: {exc.strerror or exc}") from None
    _SCANS[key] = shard
    return shard if shard.path == path else replace(shard, path=path)  # the same file by another name


def cache_folder() -> Path:
    """Where shard scans are kept between commands."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mcpipe" / "webdataset"


_LISTS = ("keys", "offset", "size", "labels", "is_index", "clean", "clean_is_index")


def _load_cached(key: str, path: Path) -> Shard | None:
    file = cache_folder() / f"{key}.json"
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
        n = len(d["keys"])
        if d["version"] != CACHE_VERSION or any(len(d[name]) != n for name in _LISTS):
            raise ValueError("lists of different lengths")
        return Shard(path, d["keys"], np.asarray(d["offset"], dtype=np.int64).reshape(n),
                     np.asarray(d["size"], dtype=np.int64).reshape(n), d["labels"],
                     np.asarray(d["is_index"], dtype=bool).reshape(n), d["clean"],
                     np.asarray(d["clean_is_index"], dtype=bool).reshape(n),
                     int(d["no_image"]), int(d["no_label"]), str(d["unlabelled"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("ignoring the cached scan %s of %s: %s", file, path, exc)
        return None


def _save_cached(key: str, shard: Shard) -> None:
    file = cache_folder() / f"{key}.json"
    d = {"version": CACHE_VERSION, "shard": str(shard.path.resolve()), "keys": shard.keys,
         "offset": shard.offset.tolist(), "size": shard.size.tolist(), "labels": shard.labels,
         "is_index": shard.is_index.astype(int).tolist(), "clean": shard.clean,
         "clean_is_index": shard.clean_is_index.astype(int).tolist(), "no_image": shard.no_image,
         "no_label": shard.no_label, "unlabelled": shard.unlabelled}
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(d, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, file)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.debug("cannot keep the scan of %s in %s: %s", shard.path, file, exc)


def _scan(f: BinaryIO, path: Path) -> Shard:
    samples = _tar_samples(f, path)
    keys, offset, size, labels, is_index, clean, clean_is_index = [], [], [], [], [], [], []
    no_image = no_label = 0
    unlabelled = ""
    for key, members in samples.items():
        images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
        if len(images) > 1:
            raise DataError(f"{path}: sample {key!r} has {len(images)} images (.{', .'.join(images)}), "
                            "expected one per key")
        if not images:
            no_image += 1
            continue
        sample = _Sample(f, path, key, members)
        label = _label(sample, ("cls", JSON_LABEL_KEYS, "txt"))
        if label is None:
            no_label += 1
            unlabelled = unlabelled or key
            continue
        clean_label = _label(sample, ("clean.cls", (JSON_CLEAN_KEY,), "clean.txt")) or ("", False)
        keys.append(key)
        offset.append(members[images[0]][0])
        size.append(members[images[0]][1])
        labels.append(label[0])
        is_index.append(label[1])
        clean.append(clean_label[0])
        clean_is_index.append(clean_label[1])
    return Shard(path, keys, np.asarray(offset, dtype=np.int64), np.asarray(size, dtype=np.int64), labels,
                 np.asarray(is_index, dtype=bool), clean, np.asarray(clean_is_index, dtype=bool),
                 no_image, no_label, unlabelled)


def _tar_samples(f: BinaryIO, path: Path) -> dict[str, Members_]:
    """key -> {extension: (offset, size)} of the regular-file members, in order of first appearance."""
    samples: dict[str, Members_] = {}
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if not m.isreg() or base.startswith(".") or "." not in base:
                    continue  # folders, links, hidden files, names without an extension
                if not _utf8(m.name):
                    raise DataError(f"{path}: member name {m.name!r} is not UTF-8; ids must be text")
                stem, ext = base.split(".", 1)
                key = m.name[: len(m.name) - len(base)].removeprefix("./") + stem
                members = samples.setdefault(key, {})
                if ext.lower() in members:
                    raise DataError(f"{path}: member {m.name} appears twice (or in two cases of its extension)")
                members[ext.lower()] = (m.offset_data, m.size)
            end = tar.offset
    except tarfile.TarError as exc:
        raise DataError(f"{path} is not a readable tar shard ({exc}); rewrite or remove it") from None
    f.seek(end)
    if f.read(1024).strip(b"\0"):  # tarfile stops quietly at a bad header after the first
        raise DataError(f"{path} is corrupt: the tar header at byte {end} is unreadable, after "
                        f"{len(samples)} samples; rewrite or remove it")
    return samples


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # tarfile keeps undecodable bytes as surrogates
        return True
    except UnicodeEncodeError:
        return False


@dataclass
class _Sample:
    """One key's members in an open shard, read as text on demand."""

    f: BinaryIO
    path: Path
    key: str
    members: Members_
    meta: dict | None = None

    def where(self, ext: str) -> str:
        return f"{self.path}: member {self.key}.{ext}"

    def text(self, ext: str) -> str:
        """Member ``.ext`` as stripped UTF-8 text ("" when the sample has none)."""
        if ext not in self.members:
            return ""
        offset, size = self.members[ext]
        self.f.seek(offset)
        try:
            return self.f.read(size).decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            raise DataError(f"{self.where(ext)} is not UTF-8 text") from None

    def json(self) -> dict:
        """The ``.json`` member as a dict ({} when there is none), parsed once."""
        if self.meta is None:
            text = self.text("json")
            try:
                self.meta = json.loads(text) if text else {}
            except json.JSONDecodeError as exc:
                raise DataError(f"{self.where('json')} is not JSON ({exc.msg}, line {exc.lineno})") from None
            if not isinstance(self.meta, dict):
                raise DataError(f"{self.where('json')} holds a {type(self.meta).__name__}, expected an object")
        return self.meta


def _label(sample: _Sample, order: tuple[str, tuple[str, ...], str]) -> tuple[str, bool] | None:
    """(label text, is a class index) from the first of ``.cls``, the json keys, ``.txt``; None if none."""
    cls_ext, json_keys, txt_ext = order
    if text := sample.text(cls_ext):
        if not INTEGER.fullmatch(text):
            raise DataError(f"{sample.where(cls_ext)} holds {text[:40]!r}, expected a class index (0, 1, ...)")
        return str(int(text)), True
    for name in json_keys:
        value = sample.json().get(name)
        if isinstance(value, bool) or not isinstance(value, (int, str, type(None))) or \
                (isinstance(value, int) and value < 0):
            raise DataError(f"{sample.where('json')}: {name!r} is {value!r}, expected a class index "
                            "(an integer >= 0) or a class name (a string)")
        if isinstance(value, int):
            return str(value), True
        if value and value.strip():
            return value.strip(), False
    if text := sample.text(txt_ext):
        return text, False
    return None


