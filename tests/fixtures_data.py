"""Tiny data sets in the real on-disk layouts of every source, for tests.

Each ``make_*`` writes into the folder it is given and returns the path to use
as ``data.root``. Images are small real PNG/JPEG files (or arrays in the real
IDX / pickle formats), coloured by class so a test can tell them apart.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

FOOD_CLASSES = ("apple_pie", "baby_back_ribs", "baklava")
CLOTHING_CLASSES = ("T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
                    "Jacket", "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_image(path: Path, *, size: tuple[int, int] = (16, 12), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A solid ``size`` (width, height) RGB image; format from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def class_color(k: int) -> tuple[int, int, int]:
    return (40 * k % 256, 255 - 40 * k % 256, 100)


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- imagefolder


def make_noisy_colour_images(root: Path, per_class: dict[str, int], *, classes: int = 3, size: int = 24) -> Path:
    """``root/<split>/c<k>/<i>.png``: a colour per class plus seeded noise (learnable, and every image differs)."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3))
                base[..., c] = 200
                pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root



def make_imagefolder(root: Path, *, classes: Sequence[str] = ("cat", "dog"), per_class: int = 2,
                     splits: Sequence[str] = (), size: tuple[int, int] = (16, 12), ext: str = ".png") -> Path:
    """``root/<class>/<class>_<i><ext>`` or, with ``splits``, ``root/<split>/<class>/...``."""
    for folder in [root / s for s in splits] or [root]:
        for k, name in enumerate(classes):
            for i in range(per_class):
                write_image(folder / name / f"{name}_{i}{ext}", size=size, color=class_color(k))
    return root


# --------------------------------------------------------------------------- manifest

MANIFEST_ROWS = {
    "train": [("images/a.png", "cat", ""), ("images/b.png", "dog", "cat"), ("images/sub/c.png", "dog", "dog")],
    "test": [("images/t1.png", "cat", "cat"), ("images/t2.png", "bird", "bird")],
}


def make_manifest(root: Path, rows: dict[str, Sequence[Sequence[str]]] | None = None, *,
                  header: Sequence[str] = ("path", "label", "clean_label"), ext: str = ".csv",
                  classes: Sequence[str] | None = None, size: tuple[int, int] = (16, 12)) -> Path:
    """``root/<split><ext>`` with ``header`` and ``rows`` (default ``MANIFEST_ROWS``), an
    image for every row's path (the ``path`` column) that stays inside root, and
    ``root/classes.txt`` when ``classes`` is given."""
    rows = MANIFEST_ROWS if rows is None else rows
    sep = "\t" if ext == ".tsv" else ","
    col = list(header).index("path") if "path" in header else 0
    for split, table in rows.items():
        write_lines(root / f"{split}{ext}", [sep.join(header), *(sep.join(r) for r in table)])
        for r in table:
            if len(r) > col and r[col] and not r[col].startswith("/") and ".." not in r[col]:
                write_image(root / r[col], size=size)
    if classes is not None:
        write_lines(root / "classes.txt", classes)
    return root


# --------------------------------------------------------------------------- Food-101N


def food_key(cls: str, i: int) -> str:
    """The image key ``<class>/<md5>.jpg`` of image ``i`` of ``cls`` in the fixture."""
    return f"{cls}/{hashlib.md5(f'{cls}{i}'.encode()).hexdigest()}.jpg"


def make_food101n(parent: Path, *, classes: Sequence[str] = FOOD_CLASSES, per_class: int = 3,
                  test_per_class: int = 2, size: tuple[int, int] = (20, 16)) -> Path:
    """``parent/Food-101N_release`` (returned) and ``parent/food-101``.

    Verification: image 0 of every class is in verified_train.tsv as right (1),
    image 1 as wrong (0); image 2 of the first class is in verified_val.tsv as 1.
    Food-101's test images are ``<class>/<100 * k + i>``.
    """
    release, food = parent / "Food-101N_release", parent / "food-101"
    keys = [food_key(c, i) for c in classes for i in range(per_class)]
    write_lines(release / "meta" / "classes.txt", ["class_name", *classes])
    write_lines(release / "meta" / "imagelist.tsv", ["class_name/key", *keys])
    header = "class_name/key\tverification_label"
    write_lines(release / "meta" / "verified_train.tsv",
                [header, *(f"{food_key(c, i)}\t{1 - i}" for c in classes for i in (0, 1))])
    write_lines(release / "meta" / "verified_val.tsv", [header, f"{food_key(classes[0], 2)}\t1"])
    for key in keys:
        write_image(release / "images" / key, size=size, color=class_color(classes.index(key.split("/")[0])))
    tests = [f"{c}/{100 * k + i}" for k, c in enumerate(classes) for i in range(test_per_class)]
    write_lines(food / "meta" / "classes.txt", sorted(classes))
    write_lines(food / "meta" / "test.txt", tests)
    for t in tests:
        write_image(food / "images" / f"{t}.jpg", size=size)
    return release


# --------------------------------------------------------------------------- Clothing1M

CLOTHING_NOISY = {f"images/0/{i:02d}/{i:07d}.jpg": i % 14 for i in range(6)}
CLOTHING_CLEAN = {
    "images/0/01/0000001.jpg": 5,  # also a noisy training image, relabelled
    "images/0/03/0000003.jpg": 3,  # also noisy, same label
    "images/1/00/1000000.jpg": 7,  # clean_train
    "images/1/01/1000001.jpg": 8,  # val
    "images/2/00/2000000.jpg": 13,  # test
    "images/2/01/2000001.jpg": 0,  # test
}
CLOTHING_LISTS = {
    "noisy_train_key_list.txt": list(CLOTHING_NOISY),
    "clean_train_key_list.txt": ["images/0/01/0000001.jpg", "images/1/00/1000000.jpg"],
    "clean_val_key_list.txt": ["images/1/01/1000001.jpg"],
    "clean_test_key_list.txt": ["images/2/00/2000000.jpg", "images/2/01/2000001.jpg"],
}


def make_clothing1m(root: Path, *, annotations: bool = False, size: tuple[int, int] = (16, 20)) -> Path:
    """Clothing1M's files at ``root`` (the text files in ``root/annotations`` with
    ``annotations``) with ``CLOTHING_NOISY`` / ``CLOTHING_CLEAN`` labels and
    ``CLOTHING_LISTS`` key lists, and an image for every key."""
    meta = root / "annotations" if annotations else root
    write_lines(meta / "category_names_eng.txt", CLOTHING_CLASSES)
    write_lines(meta / "noisy_label_kv.txt", [f"{k} {v}" for k, v in CLOTHING_NOISY.items()])
    write_lines(meta / "clean_label_kv.txt", [f"{k} {v}" for k, v in CLOTHING_CLEAN.items()])
    for name, keys in CLOTHING_LISTS.items():
        write_lines(meta / name, keys)
    for key in {**CLOTHING_NOISY, **CLOTHING_CLEAN}:
        write_image(root / key, size=size)
    return root


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None) -> Path:
    """``array`` (uint8, 1-d labels or 3-d images) as an IDX file, gzipped when ``path`` ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = (2051 if array.ndim == 3 else 2049) if magic is None else magic
    data = struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def idx_arrays(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) = i % 10) with seeded random pixels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def make_idx(root: Path, *, n_train: int = 12, n_test: int = 5, gz: bool = True) -> Path:
    """The four MNIST / Fashion-MNIST IDX files; pixels from ``idx_arrays(n, seed=0 / 1)``."""
    suffix = ".gz" if gz else ""
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = idx_arrays(n, seed=seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return root


# --------------------------------------------------------------------------- CIFAR-10


def cifar_batch(n: int, *, seed: int, name: str) -> dict[bytes, object]:
    """A batch dict as in the real files: bytes keys, (n, 3072) uint8 channel-major data."""
    rng = np.random.default_rng(seed)
    labels = [int(x) for x in rng.integers(0, 10, size=n)]
    return {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"{CIFAR_CLASSES[y]}_s_{seed:02d}{i:04d}.png".encode() for i, y in enumerate(labels)],
    }


class Python2Pickler(pickle._Pickler):
    """Writes the opcode stream Python 2's cPickle wrote for the real CIFAR files:
    protocol 2, every str/bytes as a BINSTRING, ``numpy.core.multiarray`` globals."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_binstring(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        n = len(data)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + data)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_binstring
    dispatch[type] = dispatch[type(len)] = dispatch[type(np.dtype)] = save_global


def make_cifar10(root: Path, *, per_batch: int = 3, n_test: int = 4, subfolder: bool = True,
                 protocol: int | str = pickle.DEFAULT_PROTOCOL) -> Path:
    """``root/cifar-10-batches-py/`` (or root itself) with 5 data batches, test_batch and
    batches.meta, written with ``pickle.dump`` at ``protocol``, or as Python 2 wrote
    them with ``protocol="python2"``; batch ``b`` uses ``cifar_batch(seed=b)``, the
    test batch seed 0."""
    folder = root / "cifar-10-batches-py" if subfolder else root
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{b}": cifar_batch(per_batch, seed=b, name=f"training batch {b} of 5") for b in range(1, 6)}
    batches["test_batch"] = cifar_batch(n_test, seed=0, name="testing batch 1 of 1")
    batches["batches.meta"] = {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                               b"label_names": [c.encode() for c in CIFAR_CLASSES]}
    for name, obj in batches.items():
        with open(folder / name, "wb") as f:
            if protocol == "python2":
                Python2Pickler(f, protocol=2).dump(obj)
            else:
                pickle.dump(obj, f, protocol=protocol)
    return root
