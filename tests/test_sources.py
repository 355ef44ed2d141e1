"""Data sources: each real layout read into the expected SplitIndex, and every refused input."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from fixtures_data import (
    CIFAR_CLASSES, CLOTHING_CLASSES, FOOD_CLASSES, cifar_batch, food_key, idx_arrays, make_cifar10,
    make_clothing1m, make_food101n, make_idx, make_imagefolder, make_manifest, write_idx, write_image,
    write_lines,
)
from mcpipe.config import DataConfig
from mcpipe.errors import DataError
from mcpipe.extract.images import ImageSkip
from mcpipe.extract.sources import cifar10, registry
from mcpipe.extract.sources.base import UNKNOWN
from mcpipe.extract.sources.registry import SOURCES, available_splits, load_index

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def cfg(source: str, root: Path, **kw) -> DataConfig:
    return DataConfig(source=source, root=str(root), **kw)


def load(source: str, root: Path, split: str, **kw):
    return SOURCES[source].load_split(cfg(source, root, **kw), split)


def assert_rgb(index, rows, size):
    for i in rows:
        img = index.load(i)
        assert img.mode == "RGB" and img.size == size


# --------------------------------------------------------------------------- registry


def test_registry_names_every_configurable_source():
    assert set(SOURCES) == {"imagefolder", "manifest", "food101n", "clothing1m", "fashion-mnist", "mnist", "cifar10",
                            "cifar100", "webdataset"}
    for module in SOURCES.values():
        assert callable(module.list_splits) and callable(module.load_split)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_missing_root_is_refused(tmp_path, source):
    with pytest.raises(DataError, match="is not a folder"):
        available_splits(cfg(source, tmp_path / "nowhere"))


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_single_split(tmp_path):
    root = make_imagefolder(tmp_path / "data", classes=("dog", "cat"), per_class=2)
    write_image(root / "cat" / "nested" / "deep.JPG")      # walked, extension in any case
    write_image(root / "cat" / ".hidden.png")              # hidden file
    write_image(root / "dog" / ".cache" / "x.png")         # hidden folder
    write_lines(root / "dog" / "notes.txt", ["not an image"])
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")  # indexed: images are not opened here
    write_image(root / ".thumbs" / "y.png")                # hidden class folder
    assert available_splits(cfg("imagefolder", root)) == ["train"]
    index = load("imagefolder", root, "train")
    assert index.root == root and index.classes == ["cat", "dog"]
    assert index.ids == ["cat/cat_0.png", "cat/cat_1.png", "cat/nested/deep.JPG",
                         "dog/broken.jpg", "dog/dog_0.png", "dog/dog_1.png"]
    assert index.labels.tolist() == [0, 0, 0, 1, 1, 1] and index.labels.dtype == np.int64
    assert index.clean_labels.tolist() == [UNKNOWN] * 6 and index.clean_labels.dtype == np.int64
    assert_rgb(index, [0, 2, 5], (16, 12))
    with pytest.raises(ImageSkip):
        index.load(3)


def test_imagefolder_split_folders_share_the_class_union(tmp_path):
    root = make_imagefolder(tmp_path, classes=("cat", "dog"), per_class=2, splits=("train", "test"))
    write_image(root / "test" / "zebra" / "z.png")
    assert available_splits(cfg("imagefolder", root)) == ["train", "test"]
    train, test = load("imagefolder", root, "train"), load("imagefolder", root, "test")
    assert train.classes == test.classes == ["cat", "dog", "zebra"]
    assert train.root == root / "train" and test.root == root / "test"
    assert train.ids == ["cat/cat_0.png", "cat/cat_1.png", "dog/dog_0.png", "dog/dog_1.png"]
    assert train.clean_labels.tolist() == [UNKNOWN] * 4
    assert test.labels.tolist() == [0, 0, 1, 1, 2] and test.clean_labels.tolist() == [0, 0, 1, 1, 2]
    assert_rgb(test, [4], (16, 12))
    with pytest.raises(DataError, match=r"no split 'val'.*available splits: train, test"):
        load("imagefolder", root, "val")


def test_imagefolder_without_images_is_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_index(cfg("imagefolder", tmp_path), "train")


# --------------------------------------------------------------------------- manifest


def test_manifest_csv_classes_are_the_union_over_all_files(tmp_path):
    root = make_manifest(tmp_path)
    assert available_splits(cfg("manifest", root)) == ["test", "train"]
    train = load("manifest", root, "train")
    assert train.classes == ["bird", "cat", "dog"] and train.root == root
    assert train.ids == ["images/a.png", "images/b.png", "images/sub/c.png"]
    assert train.labels.tolist() == [1, 2, 2]
    assert train.clean_labels.tolist() == [UNKNOWN, 1, 2]
    assert load("manifest", root, "test").labels.tolist() == [1, 0]
    assert_rgb(train, [0, 2], (16, 12))


def test_manifest_tsv_any_column_order_extra_columns_no_clean(tmp_path):
    rows = {"train": [("x", "./b.png", "dog"), ("y", "a.png", "cat")]}
    root = make_manifest(tmp_path, rows, header=("note", "path", "label"), ext=".tsv")
    index = load("manifest", root, "train")
    assert index.ids == ["b.png", "a.png"] and index.labels.tolist() == [1, 0]
    assert index.clean_labels.tolist() == [UNKNOWN, UNKNOWN]


def test_manifest_paths_are_normalised(tmp_path):
    rows = {"train": [("images\\a.png", "cat", ""), ("./images//b.png", "dog", "")]}
    root = make_manifest(tmp_path, rows)
    assert load("manifest", root, "train").ids == ["images/a.png", "images/b.png"]
    with pytest.raises(DataError, match=r"no split 'val'.*available splits: train \('val' needs val.csv or val.tsv\)"):
        load("manifest", root, "val")


def test_manifest_integer_labels_are_indices(tmp_path):
    root = make_manifest(tmp_path, {"train": [("a.png", "3", ""), ("b.png", "0", "1")]})
    index = load("manifest", root, "train")
    assert index.classes == ["0", "1", "2", "3"]
    assert index.labels.tolist() == [3, 0] and index.clean_labels.tolist() == [UNKNOWN, 1]


def test_manifest_classes_txt_fixes_order_and_refuses_others(tmp_path):
    root = make_manifest(tmp_path, {"train": [("a.png", "dog", ""), ("b.png", "cat", "dog")]},
                         classes=["dog", "cat"])
    index = load("manifest", root, "train")
    assert index.classes == ["dog", "cat"] and index.labels.tolist() == [0, 1]
    assert index.clean_labels.tolist() == [UNKNOWN, 0]
    write_lines(root / "classes.txt", ["dog"])
    with pytest.raises(DataError, match=r"train.csv line 3: label 'cat' is not one of the 1 classes"):
        load("manifest", root, "train")


@pytest.mark.parametrize("path, message", [
    ("../outside.png", r"line 3: path '../outside.png' leaves the data root"),
    ("/etc/passwd", r"line 3: path '/etc/passwd' is absolute"),
    ("", r"line 3: path '' is empty"),
    ("C:\\data\\x.png", r"line 3: path .* is absolute"),
])
def test_manifest_refuses_paths_outside_root(tmp_path, path, message):
    root = make_manifest(tmp_path, {"train": [("ok.png", "cat", ""), (path, "cat", "")]})
    with pytest.raises(DataError, match=message) as err:
        load("manifest", root, "train")
    assert "train.csv" in str(err.value)


def test_manifest_refuses_missing_column_and_short_row(tmp_path):
    root = make_manifest(tmp_path, {"train": [("a.png", "cat")]}, header=("path", "class"))
    with pytest.raises(DataError, match=r"train.csv line 1: header lacks the column\(s\) label.*'path', 'class'"):
        load("manifest", root, "train")
    root = make_manifest(tmp_path / "b", {"train": [("a.png", "cat", ""), ("b.png",)]})
    with pytest.raises(DataError, match=r"train.csv line 3: 1 fields, expected at least 3"):
        load("manifest", root, "train")


def test_manifest_duplicate_path_is_refused_by_load_index(tmp_path):
    root = make_manifest(tmp_path, {"train": [("a.png", "cat", ""), ("./a.png", "dog", "")]})
    with pytest.raises(DataError, match="'a.png' appears more than once"):
        load_index(cfg("manifest", root), "train")


# --------------------------------------------------------------------------- Food-101N


def food_ids(pairs):
    return [f"images/{food_key(FOOD_CLASSES[k], i)}" for k, i in pairs]


def test_food101n_splits_labels_and_verification(tmp_path):
    release = make_food101n(tmp_path)
    c = cfg("food101n", release)
    assert available_splits(c) == ["train", "verified_train", "verified_val", "test"]

    train = load("food101n", release, "train")
    assert train.classes == list(FOOD_CLASSES) and train.root == release
    assert train.ids == food_ids([(k, i) for k in range(3) for i in range(3)])
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.verified.dtype == np.int8
    assert train.verified.tolist() == [1, 0, 1, 1, 0, -1, 1, 0, -1]
    assert train.clean_labels.tolist() == [0, -1, 0, 1, -1, -1, 2, -1, -1]
    assert_rgb(train, [0, 8], (20, 16))

    vtrain = load("food101n", release, "verified_train")
    assert vtrain.ids == food_ids([(k, i) for k in range(3) for i in (0, 1)])
    assert vtrain.verified.tolist() == [1, 0, 1, 0, 1, 0]
    assert vtrain.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert vtrain.clean_labels.tolist() == [0, -1, 1, -1, 2, -1]
    vval = load("food101n", release, "verified_val")
    assert vval.ids == food_ids([(0, 2)]) and vval.clean_labels.tolist() == [0]


def test_food101n_test_is_food101(tmp_path):
    release = make_food101n(tmp_path)
    test = load("food101n", release, "test")
    assert test.root == (tmp_path / "food-101").resolve()
    assert test.ids == [f"images/{c}/{100 * k + i}.jpg" for k, c in enumerate(FOOD_CLASSES) for i in range(2)]
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2] and test.clean_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.verified is None
    assert_rgb(test, [0, 5], (20, 16))
    moved = tmp_path / "elsewhere"
    (tmp_path / "food-101").rename(moved)
    assert "test" not in available_splits(cfg("food101n", release))
    assert load("food101n", release, "test", test_root=str(moved)).root == moved


def test_food101n_parent_folder_is_accepted(tmp_path):
    make_food101n(tmp_path)
    assert available_splits(cfg("food101n", tmp_path)) == ["train", "verified_train", "verified_val", "test"]


def test_food101n_refuses_bad_metadata(tmp_path):
    release = make_food101n(tmp_path)
    meta = release / "meta"
    lines = meta.joinpath("imagelist.tsv").read_text().splitlines()
    write_lines(meta / "imagelist.tsv", lines[1:])  # header dropped
    with pytest.raises(DataError, match=r"imagelist.tsv line 1: expected the header 'class_name/key'"):
        load("food101n", release, "train")
    write_lines(meta / "imagelist.tsv", [*lines, "pizza/abc.jpg"])
    with pytest.raises(DataError, match=r"imagelist.tsv line 11: class 'pizza' .* not in meta/classes.txt"):
        load("food101n", release, "train")
    write_lines(meta / "imagelist.tsv", lines)
    write_lines(meta / "verified_val.tsv", ["class_name/key\tverification_label", f"{food_key('baklava', 0)}\tyes"])
    with pytest.raises(DataError, match=r"verified_val.tsv line 2: expected <class_name>/<key><TAB>0 or 1"):
        load("food101n", release, "verified_val")
    write_lines(tmp_path / "food-101" / "meta" / "classes.txt", ["apple_pie", "baklava", "pizza"])
    with pytest.raises(DataError, match=r"do not match Food-101N's .*'pizza'.*'baby_back_ribs'"):
        load("food101n", release, "test")
    with pytest.raises(DataError, match=r"no split 'val'.*available splits: train, verified_train, verified_val, test"):
        load("food101n", release, "val")


def test_food101n_verified_image_missing_from_imagelist_is_left_out(tmp_path, caplog):
    release = make_food101n(tmp_path)
    path = release / "meta" / "verified_val.tsv"
    write_lines(path, [*path.read_text().splitlines(), "baklava/0123.jpg\t1"])
    with caplog.at_level(logging.WARNING):
        index = load("food101n", release, "verified_val")
    assert index.ids == food_ids([(0, 2)])
    assert "1 verified image(s) are not in imagelist.tsv" in caplog.text


# --------------------------------------------------------------------------- Clothing1M


@pytest.mark.parametrize("annotations", [False, True])
def test_clothing1m_splits_and_labels(tmp_path, annotations):
    root = make_clothing1m(tmp_path, annotations=annotations)
    assert available_splits(cfg("clothing1m", root)) == ["train", "clean_train", "val", "test"]
    train = load("clothing1m", root, "train")
    assert train.classes == list(CLOTHING_CLASSES) and train.root == root
    assert train.ids == [f"images/0/{i:02d}/{i:07d}.jpg" for i in range(6)]
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert train.clean_labels.tolist() == [-1, 5, -1, 3, -1, -1]
    clean = load("clothing1m", root, "clean_train")
    assert clean.ids == ["images/0/01/0000001.jpg", "images/1/00/1000000.jpg"]
    assert clean.labels.tolist() == clean.clean_labels.tolist() == [5, 7]
    assert load("clothing1m", root, "val").labels.tolist() == [8]
    test = load("clothing1m", root, "test")
    assert test.labels.tolist() == test.clean_labels.tolist() == [13, 0]
    assert_rgb(test, [0, 1], (16, 20))


def test_clothing1m_refuses_unlabelled_key_and_bad_line(tmp_path):
    root = make_clothing1m(tmp_path)
    write_lines(root / "clean_test_key_list.txt", ["images/2/00/2000000.jpg", "images/9/99/9999999.jpg"])
    with pytest.raises(DataError, match=r"key 'images/9/99/9999999.jpg' has no label in .*clean_label_kv.txt"):
        load("clothing1m", root, "test")
    write_lines(root / "noisy_label_kv.txt", ["images/0/00/0000000.jpg 0", "images/0/01/0000001.jpg"])
    with pytest.raises(DataError, match=r"noisy_label_kv.txt line 2: expected '<image key> <label index>'"):
        load("clothing1m", root, "train")
    (root / "clean_val_key_list.txt").unlink()
    with pytest.raises(DataError, match=r"no split 'val'.*available splits: train, clean_train, test "
                                        r"\('val' needs clean_val_key_list.txt and clean_label_kv.txt\)"):
        load("clothing1m", root, "val")
    (root / "category_names_eng.txt").unlink()
    with pytest.raises(DataError, match=r"Clothing1M class list .*category_names_eng.txt is missing"):
        load("clothing1m", root, "clean_train")


# --------------------------------------------------------------------------- MNIST, Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files(tmp_path, gz):
    root = make_idx(tmp_path, n_train=12, n_test=5, gz=gz)
    assert available_splits(cfg("fashion-mnist", root)) == ["train", "test"]
    train = load("fashion-mnist", root, "train")
    images, labels = idx_arrays(12, seed=0)
    assert train.ids[:2] == ["train/00000", "train/00001"] and len(train) == 12
    assert np.array_equal(train.pixels, images) and train.pixels.shape == (12, 28, 28)
    assert train.labels.tolist() == labels.tolist() and train.labels.dtype == np.int64
    assert np.array_equal(train.clean_labels, train.labels)
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot" and len(train.classes) == 10
    img = train.load(3)
    assert img.mode == "RGB" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img)[:, :, 1], images[3])
    test = load("fashion-mnist", root, "test")
    assert test.ids[-1] == "test/00004" and np.array_equal(test.pixels, idx_arrays(5, seed=1)[0])


def test_mnist_classes_and_torchvision_layout(tmp_path):
    root = make_idx(tmp_path / "MNIST" / "raw", n_train=4, n_test=3, gz=False)
    index = load("mnist", tmp_path, "test")
    assert index.classes == [str(d) for d in range(10)] and index.root == root
    assert index.labels.tolist() == [0, 1, 2]


def test_idx_refuses_bad_files(tmp_path):
    root = make_idx(tmp_path, n_train=4, n_test=3, gz=True)
    images, labels = idx_arrays(4)
    write_idx(root / "train-images-idx3-ubyte.gz", images, magic=2049)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: magic number 2049, expected 2051"):
        load("mnist", root, "train")
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x04\x00\x00\x00\x1c\x00\x00\x00\x1c" + b"\0" * 10)
    with pytest.raises(DataError, match=r"26 bytes, expected 3152 for shape \(4, 28, 28\)"):
        load("mnist", root, "train")
    write_idx(root / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:3])
    with pytest.raises(DataError, match=r"holds 4 images but .* 3 labels"):
        load("mnist", root, "train")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"no split 'test'.*available splits: train"):
        load("mnist", root, "test")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    c = cfg("fashion-mnist", DEBIAN_FASHION)
    assert available_splits(c) == ["train", "test"]
    train = load_index(c, "train")
    assert len(train) == 60000 and train.pixels.shape == (60000, 28, 28) and train.ids[-1] == "train/59999"
    assert np.bincount(train.labels).tolist() == [6000] * 10
    test = load_index(c, "test")
    assert len(test) == 10000 and np.bincount(test.labels).tolist() == [1000] * 10
    assert test.load(0).size == (28, 28)
    assert test.labels[:3].tolist() == [9, 2, 1]  # Ankle boot, Pullover, Trouser: the published first test labels


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", ["python2", 2, pickle.DEFAULT_PROTOCOL, 5])
def test_cifar10_batches(tmp_path, protocol):
    root = make_cifar10(tmp_path, per_batch=3, n_test=4, protocol=protocol)
    assert available_splits(cfg("cifar10", root)) == ["train", "test"]
    train = load("cifar10", root, "train")
    batches = [cifar_batch(3, seed=b, name="") for b in range(1, 6)]
    assert train.classes == list(CIFAR_CLASSES) and train.root == root / "cifar-10-batches-py"
    assert train.ids == [f"train/{n.decode()}" for b in batches for n in b[b"filenames"]]
    assert train.labels.tolist() == [y for b in batches for y in b[b"labels"]]
    assert np.array_equal(train.clean_labels, train.labels)
    data = np.concatenate([b[b"data"] for b in batches])
    assert train.pixels.shape == (15, 32, 32, 3)
    assert np.array_equal(train.pixels, data.reshape(15, 3, 32, 32).transpose(0, 2, 3, 1))
    assert train.pixels[4, 0, 1, 2] == data[4, 2 * 1024 + 1]  # blue plane, row 0, column 1
    img = train.load(4)
    assert img.mode == "RGB" and img.size == (32, 32) and np.array_equal(np.asarray(img), train.pixels[4])
    assert len(load("cifar10", root, "test")) == 4


def test_cifar10_batches_in_root_itself(tmp_path):
    make_cifar10(tmp_path, subfolder=False)
    assert load("cifar10", tmp_path, "test").ids[0].startswith("test/")


_CALLED = []


def _record_call():
    _CALLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_record_call, ())


def test_cifar10_refuses_pickled_code(tmp_path):
    root = make_cifar10(tmp_path)
    batch = {**cifar_batch(3, seed=1, name=""), b"extra": _Payload()}
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(DataError, match=r"data_batch_1: refusing to load the global test_sources._record_call"):
        load("cifar10", root, "train")
    assert _CALLED == []


def test_cifar10_refuses_malformed_batches(tmp_path):
    folder = make_cifar10(tmp_path) / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(DataError, match="test_batch is not a readable CIFAR pickle"):
        load("cifar10", tmp_path, "test")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"test_batch: missing key\(s\) \['filenames'\]"):
        load("cifar10", tmp_path, "test")
    assert cifar10.list_splits(cfg("cifar10", tmp_path)) == ["train", "test"]
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match=r"no split 'train'.*available splits: test"):
        load("cifar10", tmp_path, "train")


# --------------------------------------------------------------------------- limit / subset


def test_limit_takes_a_seeded_sorted_subset(tmp_path):
    root = make_imagefolder(tmp_path, classes=("a", "b", "c"), per_class=4)
    full = load_index(cfg("imagefolder", root), "train")
    assert len(full) == 12
    first = load_index(cfg("imagefolder", root, limit=5, seed=3), "train")
    again = load_index(cfg("imagefolder", root, limit=5, seed=3), "train")
    other = load_index(cfg("imagefolder", root, limit=5, seed=4), "train")
    assert first.ids == again.ids and len(first) == 5 and first.ids != other.ids
    rows = [full.ids.index(x) for x in first.ids]
    assert rows == sorted(rows)
    assert first.labels.tolist() == [int(full.labels[r]) for r in rows]
    head = load_index(cfg("imagefolder", root, limit=5, subset="first"), "train")
    assert head.ids == full.ids[:5]
    assert load_index(cfg("imagefolder", root, limit=50), "train").ids == full.ids


def test_limit_keeps_pixels_and_verification_aligned(tmp_path):
    make_cifar10(tmp_path)
    full = load_index(cfg("cifar10", tmp_path), "train")
    part = load_index(cfg("cifar10", tmp_path, limit=4, seed=1), "train")
    rows = [full.ids.index(x) for x in part.ids]
    assert np.array_equal(part.pixels, full.pixels[rows])
    release = make_food101n(tmp_path / "food")
    full = load_index(cfg("food101n", release), "train")
    part = load_index(cfg("food101n", release, limit=4, seed=2), "train")
    rows = [full.ids.index(x) for x in part.ids]
    assert part.verified.tolist() == full.verified[rows].tolist()


def test_unknown_source_is_a_config_error(tmp_path):
    from mcpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="data.source = 'imagenet'"):
        registry.available_splits(DataConfig(source="imagenet", root=str(tmp_path)))  # type: ignore[arg-type]


def _cifar100(root: Path, n: dict[str, int], *, protocol=pickle.DEFAULT_PROTOCOL) -> dict[str, dict]:
    """``root/cifar-100-python/{train,test,meta}`` as the release has them (bytes keys)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"class{k:02d}".encode() for k in range(100)]
    files = {"meta": {b"fine_label_names": fine, b"coarse_label_names": [f"super{k}".encode() for k in range(20)]}}
    for seed, (split, count) in enumerate(n.items()):
        rng = np.random.default_rng(seed)
        labels = [int(x) for x in rng.integers(0, 100, size=count)]
        files[split] = {b"filenames": [f"img_{split}_{i}.png".encode() for i in range(count)], b"batch_label": b"x",
                        b"fine_labels": labels, b"coarse_labels": [y // 5 for y in labels],
                        b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)}
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    return files


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar100_files(tmp_path, protocol):
    files = _cifar100(tmp_path, {"train": 5, "test": 3}, protocol=protocol)
    assert available_splits(cfg("cifar100", tmp_path)) == ["train", "test"]
    train = load("cifar100", tmp_path, "train")
    assert len(train.classes) == 100 and train.classes[7] == "class07"
    assert train.root == tmp_path / "cifar-100-python"
    assert train.labels.tolist() == files["train"][b"fine_labels"] == train.clean_labels.tolist()
    assert train.ids == [f"train/img_train_{i}.png" for i in range(5)]  # the files' order, as CIFAR-100N follows
    data = files["train"][b"data"]
    img = np.asarray(train.load(2))
    assert img.shape == (32, 32, 3) and (img[..., 0].reshape(-1) == data[2, :1024]).all()  # channel-major rows
    assert (img[..., 2].reshape(-1) == data[2, 2048:]).all()
    assert len(load("cifar100", tmp_path, "test")) == 3


def test_cifar100_refuses_what_is_not_a_cifar_file(tmp_path):
    _cifar100(tmp_path, {"train": 2})
    with pytest.raises(DataError, match="no split 'test'"):
        load("cifar100", tmp_path, "test")
    folder = tmp_path / "cifar-100-python"
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": Path("x")}, f)  # a pickle that would build another object
    with pytest.raises(DataError, match="refusing to load the global pathlib"):
        load("cifar100", tmp_path, "train")
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"filenames": [b"a"]}, f)
    with pytest.raises(DataError, match=r"missing key\(s\) \['fine_labels'\]"):
        load("cifar100", tmp_path, "train")


def index_of(source: str, root: Path, split: str, **kw):
    """Through the registry, as the pipeline loads a split (label sets applied, then checks and limit)."""
    return load_index(cfg(source, root, **kw), split)


def test_cifar10n_and_cifar100n_label_sets(tmp_path):
    import torch

    root = make_cifar10(tmp_path / "c10", per_batch=3, n_test=4)
    truth = index_of("cifar10", root, "train").labels
    rng = np.random.default_rng(0)
    sets = {k: (truth + rng.integers(0, 2, len(truth))) % 10 for k in
            ("aggre_label", "worse_label", "random_label1", "random_label2", "random_label3")}
    torch.save({**sets, "clean_label": truth.copy()}, root / "CIFAR-10_human.pt")  # numpy arrays, as released
    for name, key in (("aggre", "aggre_label"), ("worst", "worse_label"), ("random2", "random_label2")):
        train = index_of("cifar10", root, "train", noisy_labels="CIFAR-10_human.pt", label_set=name)
        assert train.labels.tolist() == sets[key].tolist() and train.clean_labels.tolist() == truth.tolist()
    test = index_of("cifar10", root, "test", noisy_labels="CIFAR-10_human.pt", label_set="aggre")
    assert test.labels.tolist() == test.clean_labels.tolist()  # only the training split changes
    limited = index_of("cifar10", root, "train", noisy_labels="CIFAR-10_human.pt", label_set="aggre", limit=5)
    full = index_of("cifar10", root, "train", noisy_labels="CIFAR-10_human.pt", label_set="aggre")
    assert limited.labels.tolist() == [full.labels[full.ids.index(i)] for i in limited.ids]  # labels follow ids

    files = _cifar100(tmp_path / "c100", {"train": 6, "test": 2})
    fine = np.asarray(files["train"][b"fine_labels"])
    torch.save({"noisy_label": torch.from_numpy((fine + 1) % 100), "clean_label": torch.from_numpy(fine)},
               tmp_path / "c100" / "CIFAR-100_human.pt")  # tensors work too
    train = index_of("cifar100", tmp_path / "c100", "train", noisy_labels="CIFAR-100_human.pt", label_set="noisy")
    assert train.labels.tolist() == ((fine + 1) % 100).tolist() and train.clean_labels.tolist() == fine.tolist()


def test_label_set_files_are_checked(tmp_path):
    import torch

    from mcpipe.errors import ConfigError

    root = make_cifar10(tmp_path, per_batch=3, n_test=4)
    truth = index_of("cifar10", root, "train").labels

    def refused(obj, label_set="aggre", match=""):
        torch.save(obj, root / "h.pt")
        with pytest.raises((DataError, ConfigError), match=match):
            index_of("cifar10", root, "train", noisy_labels="h.pt", label_set=label_set)

    refused({"aggre_label": truth[:-1], "clean_label": truth[:-1]}, match="labels 14 images, the cifar10 'train' split has 15")
    refused({"aggre_label": truth, "clean_label": (truth + 1) % 10}, match="clean_label differs .* on 15 of 15")
    refused({"worse_label": truth, "clean_label": truth}, match="has no 'aggre_label'")
    refused({"aggre_label": truth + 10, "clean_label": truth}, match="outside 0..9")
    refused({"aggre_label": truth, "clean_label": truth}, label_set="best", match="data.label_set = 'best' is invalid")
    refused({"aggre_label": Path("x")}, match="not a label file of integer arrays")  # weights_only refuses
    (root / "h.pt").write_bytes(b"truncated")
    with pytest.raises(DataError, match="not a label file"):
        index_of("cifar10", root, "train", noisy_labels="h.pt", label_set="aggre")
    with pytest.raises(DataError, match="does not exist"):
        index_of("cifar10", root, "train", noisy_labels="nope.pt", label_set="aggre")
    with pytest.raises(ConfigError, match="data.label_set"):
        DataConfig(source="cifar10", root=str(root), noisy_labels="h.pt")
