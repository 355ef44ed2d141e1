"""``mcpipe import``: a feature store from embeddings a user already has.

Two layouts are read:

* ``.npy`` arrays (one or more, concatenated by rows in the order given) and a
  CSV/TSV with columns ``id``, ``label`` (a class name) and optionally
  ``clean_label`` (a class name, empty = unknown) and ``path`` (the image
  file); row ``i`` of the table describes row ``i`` of the arrays.
* clip-retrieval's output folder: ``img_emb/img_emb_{i}.npy`` with
  ``metadata/metadata_{i}.parquet`` (column ``image_path``, the id and the
  image file, and a label column); reading parquet needs pyarrow (optional).

The class list is the sorted set of label names, a ``--classes`` file (one name
per line), or -- for any split but ``train`` -- the one of ``train.h5`` already
in the output folder, so the splits agree. Everything is checked before the
output is touched (shapes, dtypes, NaN/inf, ids, class names); the store is
written through :class:`mcpipe.store.writer.StoreWriter` (atomic creation, then
blocks) and records backbone ``imported`` and every source file with its
sha256 (attribute ``import_sources``, JSON).

Image paths (a non-empty ``path`` column, or clip-retrieval's ``image_path``)
are kept in the store's optional ``paths`` dataset, for the report's contact
sheet. A relative path is taken relative to the folder of the file that names
it -- the labels file, or the ``--clip-retrieval`` folder -- and stored made
absolute (lexically: no file is touched, symlinks are kept), so the store finds
its images from any working directory and from any run folder, as
``import_sources`` finds its inputs. A path that does not exist is kept as it
is: the report says which images it could not read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mcpipe
from mcpipe.errors import ConfigError, DataError
from mcpipe.extract.sources.base import SplitIndex
from mcpipe.hashing import sha256_file
from mcpipe.labels import read_table
from mcpipe.store.schema import FEATURE_DTYPES, SCHEMA_VERSION, Provenance
from mcpipe.store.writer import StoreSpec, StoreWriter

log = logging.getLogger(__name__)

BACKBONE = "imported"
BLOCK_ROWS = 65536
CHUNK_ROWS = 256
_SCAN_ROWS = 65536
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ImportResult:
    path: Path
    split: str
    rows: int
    feature_dim: int
    num_classes: int
    seconds: float


@dataclass
class _Table:
    """What the labels file (or the parquet metadata) says about the rows."""

    ids: list[str]
    labels: list[str]
    clean: list[str]  # "" = unknown
    source: str       # for messages: which file / column
    paths: list[str] | None = None  # image files as given ("" = unknown); None = no path column


# ---------------------------------------------------------------- files




def _load_array(path: Path) -> np.ndarray:
    """A memory-mapped 2-D float array from ``path``, or a DataError naming what is wrong."""
    if not path.is_file():
        raise DataError(f"embeddings file {path} does not exist")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"embeddings file {path} is not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"embeddings file {path} is not a single .npy array (an .npz archive?)")
    if arr.ndim != 2:
        raise DataError(f"embeddings file {path} has shape {arr.shape}; expected a 2-D array (rows, dims)")
    if arr.dtype.kind != "f":
        raise DataError(f"embeddings file {path} has dtype {arr.dtype}; expected floating point "
                        "(float16, float32 or float64)")
    if arr.shape[1] == 0:
        raise DataError(f"embeddings file {path} has 0 dimensions per row")
    return arr


def _check_arrays(paths: list[Path], arrays: list[np.ndarray], dtype: str) -> None:
    dims = {a.shape[1] for a in arrays}
    if len(dims) > 1:
        shown = ", ".join(f"{p.name}: {a.shape[1]}" for p, a in zip(paths, arrays))
        raise DataError(f"embeddings files have different dimensions ({shown}); all must have the same")
    limit = np.finfo(dtype).max
    for p, a in zip(paths, arrays):
        for start in range(0, a.shape[0], _SCAN_ROWS):
            block = np.asarray(a[start:start + _SCAN_ROWS])
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                raise DataError(f"embeddings file {p} has NaN or infinite values (first at row "
                                f"{start + int(np.flatnonzero(bad)[0])})")
            big = (np.abs(block) > limit).any(axis=1)
            if big.any():
                raise DataError(f"embeddings file {p} has values beyond the {dtype} range (first at row "
                                f"{start + int(np.flatnonzero(big)[0])}); use --dtype float32")


def read_labels_table(path: Path) -> _Table:
    """Rows of a CSV/TSV with columns id, label [, clean_label, path] (:func:`mcpipe.labels.read_table`)."""
    text = read_table(path, ("id", "label"), optional=("clean_label", "path"), what="labels file",
                      expected="id, label [, clean_label, path]")
    ids, labels = text.values("id"), text.values("label")
    for line, i, lab in zip(text.lines, ids, labels):
        if not i:
            raise DataError(f"labels file {path} line {line} has an empty id")
        if not lab:
            raise DataError(f"labels file {path} line {line} (id {i!r}) has an empty label")
    paths = text.values("path")
    return _Table(ids, labels, text.values("clean_label"), str(path), paths if any(paths) else None)


def _read_parquet(path: Path, columns: list[str]) -> dict[str, list]:
    """``columns`` of a parquet file as lists; pyarrow is an optional dependency."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from None
    try:
        schema_names = pq.read_schema(path).names
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types
        raise DataError(f"metadata file {path} is not a readable parquet file ({exc})") from None
    missing = [c for c in columns if c not in schema_names]
    if missing:
        raise DataError(f"metadata file {path} lacks column(s) {', '.join(missing)}: it has {schema_names}")
    table = pq.read_table(path, columns=columns)
    return {c: table.column(c).to_pylist() for c in columns}


def _clip_retrieval_parts(root: Path) -> list[tuple[Path, Path]]:
    """(img_emb_i.npy, metadata_i.parquet) pairs of a clip-retrieval output folder, by i."""
    if not root.is_dir():
        raise DataError(f"--clip-retrieval {root} is not a folder")
    pattern = {"img_emb": re.compile(r"^img_emb_(\d+)\.npy$"), "metadata": re.compile(r"^metadata_(\d+)\.parquet$")}
    found: dict[str, dict[int, Path]] = {}
    for sub, rx in pattern.items():
        folder = root / sub
        if not folder.is_dir():
            raise DataError(f"--clip-retrieval {root} lacks the folder {sub}/ (expected img_emb/img_emb_{{i}}.npy "
                            "and metadata/metadata_{i}.parquet)")
        found[sub] = {int(m.group(1)): p for p in folder.iterdir() if (m := rx.match(p.name))}
    emb, meta = found["img_emb"], found["metadata"]
    if not emb:
        raise DataError(f"--clip-retrieval {root}/img_emb holds no img_emb_{{i}}.npy files")
    if set(emb) != set(meta):
        lonely = sorted(set(emb) ^ set(meta))[0]
        which = "metadata_%d.parquet" if lonely in emb else "img_emb_%d.npy"
        raise DataError(f"--clip-retrieval {root}: part {lonely} lacks {which % lonely}")
    return [(emb[i], meta[i]) for i in sorted(emb)]


def _read_clip_retrieval(root: Path, label_column: str) -> tuple[list[Path], list[np.ndarray], _Table, list[Path]]:
    parts = _clip_retrieval_parts(root)
    arrays, ids, labels = [], [], []
    for npy, parquet in parts:
        arr = _load_array(npy)
        meta = _read_parquet(parquet, ["image_path", label_column])
        if len(meta["image_path"]) != arr.shape[0]:
            raise DataError(f"{npy} has {arr.shape[0]} rows but {parquet} has {len(meta['image_path'])}; "
                            "they must describe the same images in the same order")
        for k, (i, lab) in enumerate(zip(meta["image_path"], meta[label_column])):
            if i is None or not str(i).strip():
                raise DataError(f"metadata file {parquet} row {k} has an empty image_path")
            if lab is None or not str(lab).strip():
                raise DataError(f"metadata file {parquet} row {k} ({i}) has an empty {label_column!r}")
            ids.append(str(i).strip())
            labels.append(str(lab).strip())
        arrays.append(arr)
    table = _Table(ids, labels, [""] * len(ids), f"{root}/metadata (column {label_column!r})", list(ids))
    return [p for p, _ in parts], arrays, table, [q for _, q in parts]


# ---------------------------------------------------------------- classes


def read_classes_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"classes file {path} does not exist")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError:
        raise DataError(f"classes file {path} is not UTF-8 text") from None
    names = [n for n in names if n]
    if not names:
        raise DataError(f"classes file {path} holds no class names (expected one per line)")
    dup = _first_duplicate(names)
    if dup is not None:
        raise DataError(f"classes file {path} lists class {dup!r} twice")
    return names


def _train_classes(out: Path) -> list[str] | None:
    train = out / "train.h5"
    if not train.exists():
        return None
    from mcpipe.store.reader import open_store

    return open_store(train, load_features=False).classes


def _first_duplicate(items: list[str]) -> str | None:
    seen: set[str] = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None


def _encode(names: list[str], classes: list[str], *, what: str, where: str, unknown_ok: bool) -> np.ndarray:
    index = {c: k for k, c in enumerate(classes)}
    out = np.empty(len(names), dtype=np.int64)
    for r, name in enumerate(names):
        if not name and unknown_ok:
            out[r] = -1
            continue
        k = index.get(name)
        if k is None:
            bad = sorted({n for n in names if n and n not in index})
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise DataError(f"{where} has {what} {name!r}{more} not in the class list ({len(classes)} classes: "
                            f"{', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
        out[r] = k
    return out


# ---------------------------------------------------------------- the import


def _fingerprint(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _source_fingerprint(split: str, ids: list[str], labels: np.ndarray, clean: np.ndarray,
                        classes: list[str]) -> str:
    """What defines the rows, hashed as extract hashes a data set's split."""
    return SplitIndex(source=BACKBONE, split=split, root=Path("."), ids=list(ids), labels=np.asarray(labels),
                      clean_labels=np.asarray(clean), classes=list(classes)).fingerprint()


def _absolute_paths(paths: list[str], base: Path) -> list[str]:
    """``paths`` made absolute against ``base`` (lexically, without touching the disk); "" and URLs kept."""
    base = str(base.resolve())
    out = [p if not p or "://" in p else os.path.abspath(os.path.join(base, os.path.expanduser(p))) for p in paths]
    first = [p for p in out if p][:3]
    if first and not any(os.path.isfile(p) for p in first):
        log.warning("the first image paths do not exist (e.g. %s): the report will not show those images", first[0])
    return out


def _rows(arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the arrays concatenated."""
    parts, offset = [], 0
    for a in arrays:
        lo, hi = max(start - offset, 0), min(stop - offset, a.shape[0])
        if lo < hi:
            parts.append(np.asarray(a[lo:hi]))
        offset += a.shape[0]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def run_import(out: Path, split: str, *, embeddings: list[Path] | None = None, labels: Path | None = None,
               clip_retrieval: Path | None = None, label_column: str = "label", classes: Path | None = None,
               dtype: str = "float16", overwrite: bool = False) -> ImportResult:
    """Check the inputs, then write ``out/<split>.h5``; see the module docstring."""
    t0 = time.perf_counter()
    embeddings = list(embeddings or [])
    if clip_retrieval is not None and (embeddings or labels is not None):
        raise ConfigError("--clip-retrieval reads the embeddings and labels itself: give it alone, "
                          "or --embeddings with --labels")
    if clip_retrieval is None and (not embeddings or labels is None):
        raise ConfigError("give --embeddings FILE.npy (repeatable) with --labels FILE.csv, or --clip-retrieval DIR")
    if not _SPLIT_NAME.match(split):
        raise ConfigError(f"--split {split!r} is invalid: expected a name like train, test or val")
    if dtype not in FEATURE_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is invalid: expected one of {', '.join(FEATURE_DTYPES)}")
    path = Path(out) / f"{split}.h5"
    if path.exists() and not overwrite:
        raise DataError(f"store {path} exists already; use --overwrite to replace it, or another --out/--split")
    if Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"--out {out} is a file, not a folder")

    # read and check everything before touching --out
    if clip_retrieval is not None:
        emb_paths, arrays, table, meta_paths = _read_clip_retrieval(Path(clip_retrieval), label_column)
    else:
        emb_paths = [Path(p) for p in embeddings]
        arrays = [_load_array(p) for p in emb_paths]
        table = read_labels_table(Path(labels))
        meta_paths = [Path(labels)]
    n = sum(a.shape[0] for a in arrays)
    if n != len(table.ids):
        sizes = " + ".join(str(a.shape[0]) for a in arrays)
        raise DataError(f"the embeddings have {n} rows ({sizes}) but {table.source} has {len(table.ids)}; "
                        "row i of the table must describe row i of the embeddings")
    if n == 0:
        raise DataError(f"{table.source} and the embeddings hold no rows")
    dup = _first_duplicate(table.ids)
    if dup is not None:
        raise DataError(f"{table.source} has id {dup!r} more than once; ids must be unique")
    _check_arrays(emb_paths, arrays, dtype)

    if classes is not None:
        class_names = read_classes_file(Path(classes))
        class_source = str(classes)
    elif split != "train":
        class_names = _train_classes(Path(out))
        if class_names is None:
            raise ConfigError(f"--split {split} must use the train split's classes: import train into {out} "
                              "first, or pass --classes FILE")
        class_source = str(Path(out) / "train.h5")
    else:
        class_names = sorted(set(table.labels))
        class_source = ""
    label_ids = _encode(table.labels, class_names, what="label", where=table.source, unknown_ok=False)
    clean_ids = _encode(table.clean, class_names, what="clean_label", where=table.source, unknown_ok=True)
    if class_source:
        log.info("classes from %s (%d)", class_source, len(class_names))

    sources = [{"role": "embeddings", "path": str(p.resolve()), "rows": int(a.shape[0]),
                "dtype": a.dtype.name, "sha256": sha256_file(p)} for p, a in zip(emb_paths, arrays)]
    sources += [{"role": "labels" if clip_retrieval is None else "metadata", "path": str(p.resolve()),
                 "sha256": sha256_file(p)} for p in meta_paths]
    if classes is not None:
        sources.append({"role": "classes", "path": str(Path(classes).resolve()), "sha256": sha256_file(Path(classes))})
    dim = int(arrays[0].shape[1])
    provenance = Provenance(
        mcpipe_version=mcpipe.__version__, dataset="imported" if clip_retrieval is None else "clip-retrieval",
        split=split, class_names=list(class_names), backbone=BACKBONE, weights="", weights_sha256="",
        random_init=False, image_size=0, preprocessing="{}", precision=",".join(sorted({a.dtype.name for a in arrays})),
        device="", data_root="",
        source_fingerprint=_source_fingerprint(split, table.ids, label_ids, clean_ids, class_names),
        config_fingerprint=_fingerprint({"backbone": BACKBONE, "dtype": dtype, "feature_dim": dim,
                                         "schema": SCHEMA_VERSION,
                                         "embeddings": [s["sha256"] for s in sources if s["role"] == "embeddings"]}))
    attrs = {**provenance.attrs(), "import_sources": json.dumps(sources, sort_keys=True), "created_unix": time.time()}
    image_paths = None
    if table.paths is not None:
        base = Path(clip_retrieval) if clip_retrieval is not None else Path(labels).parent
        image_paths = _absolute_paths(table.paths, base)
    spec = StoreSpec(ids=table.ids, labels=label_ids, clean_labels=clean_ids, feature_dim=dim, dtype=dtype,
                     block_rows=BLOCK_ROWS, chunk_rows=CHUNK_ROWS, attrs=attrs, paths=image_paths)
    with StoreWriter.open(path, spec, overwrite=overwrite) as w:
        for b in w.pending_blocks():
            lo, hi = w.block_range(b)
            w.write_block(b, _rows(arrays, lo, hi), np.zeros(hi - lo, np.uint8))
    return ImportResult(path=path, split=split, rows=n, feature_dim=dim, num_classes=len(class_names),
                        seconds=time.perf_counter() - t0)

