"""data.source = "webdataset": .tar shards (img2dataset's output) on small generated shards.

Layouts and splits, the label members (.cls, .json, .txt) and their order, classes.txt, clean labels,
what is left out and what is refused (one line), bad image members skipped like bad files, and the
whole pipeline: extract gives the features of the same images in an imagefolder, resumes after kill -9
to the uninterrupted store, and the report and finetune reach the images through the index.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from fixtures_data import make_noisy_colour_images
from mcpipe.cli import app
from mcpipe.config import DataConfig
from mcpipe.errors import DataError
from mcpipe.extract.data import IndexImages
from mcpipe.extract.images import ImageSkip
from mcpipe.extract.preprocess import eval_transform, preprocess_for
from mcpipe.extract.sources import tar_shards
from mcpipe.extract.sources.registry import available_splits, load_index
from mcpipe.store.reader import open_store
import test_interrupt
from conftest import TINY, mcpipe
from test_interrupt import assert_same_store, kill9_at, run

@pytest.fixture(autouse=True)
def scan_cache(tmp_path_factory, monkeypatch) -> Path:
    """Shard scans kept in a folder of the test's own, for this process and the commands it starts."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    monkeypatch.setitem(test_interrupt.ENV, "XDG_CACHE_HOME", str(folder))
    monkeypatch.setattr(tar_shards, "_SCANS", {})
    return folder / "mcpipe" / "webdataset"


# --------------------------------------------------------------------------- shards


def image_bytes(seed: int, fmt: str = "PNG", size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """A .tar of (member name, content) in the order given, as WebDataset's TarWriter writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def samples(keys: list[str], *, label: str = "cls", values: list | None = None, seed: int = 0) -> list:
    """Members of ``keys``: a PNG each and a label member of kind ``label`` (cls, txt, json)."""
    out = []
    for i, key in enumerate(keys):
        value = values[i] if values is not None else i % 3
        out.append((f"{key}.png", image_bytes(seed + i)))
        if label == "json":
            out.append((f"{key}.json", json.dumps({"url": "http://x", "key": key, "status": "success",
                                                   "label": value})))
        else:
            out.append((f"{key}.{label}", str(value)))
    return out


def index_of(root: Path, split: str = "train"):
    return load_index(DataConfig(source="webdataset", root=str(root)), split)


def shards_from_folder(folder: Path, out: Path, *, per_shard: int, name: str = "{:05d}.tar") -> Path:
    """An imagefolder split (``folder/<class>/<file>``) as shards: the same image bytes, the class as .txt,
    keys ``<class>/<file stem>``, rows in the imagefolder's order."""
    files = sorted((c.name, f.name) for c in folder.iterdir() for f in c.iterdir())
    for s in range(0, len(files), per_shard):
        write_shard(out / name.format(s // per_shard), [
            m for c, f in files[s: s + per_shard]
            for m in ((f"{c}/{f}", (folder / c / f).read_bytes()), (f"{c}/{f.split('.')[0]}.txt", c))])
    return out


def one_line_error(res) -> str:
    """The one ``error:`` line of a refused command: exit 1, no traceback."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def extract(out: Path, root: Path, *extra: str, args: tuple[str, ...] = ()):
    keys = (*TINY, "data.source=webdataset", f"data.root={root}", *extra)
    return CliRunner().invoke(app, ["extract", "--no-progress", "--log-level", "error", "--out", str(out), *args,
                                    *[a for k in keys for a in ("--set", k)]])


# --------------------------------------------------------------------------- labels and classes


def test_labels_from_cls_json_and_txt(tmp_path):
    write_shard(tmp_path / "00000.tar", samples(["a0", "a1", "a2"], label="cls", values=[0, 2, 1]))
    write_shard(tmp_path / "00001.tar", samples(["b0", "b1"], label="json", values=[1, 1]))
    index = index_of(tmp_path)
    assert index.ids == ["a0", "a1", "a2", "b0", "b1"]
    assert index.classes == ["0", "1", "2"] and list(index.labels) == [0, 2, 1, 1, 1]
    assert list(index.clean_labels) == [-1] * 5 and index.source == "webdataset"
    assert index.load(1).size == (20, 20) and index.load(1).mode == "RGB"
    assert np.array_equal(np.asarray(index.load(1)), np.asarray(Image.open(io.BytesIO(image_bytes(1)))))

    names = tmp_path / "names"
    write_shard(names / "00000.tar", samples(["k0", "k1", "k2"], label="txt", values=["dog", "cat", "dog"])
                + samples(["k3"], label="json", values=["owl"], seed=3))
    index = index_of(names)
    assert index.classes == ["cat", "dog", "owl"] and list(index.labels) == [1, 0, 1, 2]


def test_cls_comes_before_json_before_txt_and_clean_labels(tmp_path):
    write_shard(tmp_path / "00000.tar", [
        ("s0.jpg", image_bytes(0, "JPEG")), ("s0.txt", "a caption, not a class"), ("s0.cls", "1"),
        ("s0.json", json.dumps({"label": "ignored"})), ("s0.clean.cls", "0"),
        ("s1.jpg", image_bytes(1, "JPEG")), ("s1.txt", "a caption"), ("s1.json", json.dumps({"label": 0})),
        ("s2.webp", image_bytes(2, "WEBP")), ("s2.json", json.dumps({"caption": "x", "class": 1, "clean_label": 1})),
        ("s3.png", image_bytes(3)), ("s3.json", json.dumps({"caption": "x", "cls": 0})), ("s3.clean.txt", "1"),
    ])
    index = index_of(tmp_path)
    assert index.ids == ["s0", "s1", "s2", "s3"] and index.classes == ["0", "1"]
    assert list(index.labels) == [1, 0, 1, 0] and list(index.clean_labels) == [0, -1, 1, 1]
    assert all(index.load(i).mode == "RGB" for i in range(4))


def test_classes_txt_fixes_the_order_and_names_indices(tmp_path):
    write_shard(tmp_path / "00000.tar", samples(["a", "b"], label="txt", values=["zebra", "ant"])
                + samples(["c"], label="cls", values=[2], seed=2))
    (tmp_path / "classes.txt").write_text("zebra\nant\nbee\n")
    index = index_of(tmp_path)
    assert index.classes == ["zebra", "ant", "bee"] and list(index.labels) == [0, 1, 2]
    (tmp_path / "classes.txt").write_text("zebra\nant\n")
    with pytest.raises(DataError, match=r"sample 'c' has the class index '2', not one of the 2 classes listed in"):
        index_of(tmp_path)
    (tmp_path / "classes.txt").write_text("zebra\nbee\nowl\n")
    with pytest.raises(DataError, match=r"'b' has the class 'ant', not one of the 3 classes listed in .*classes.txt"):
        index_of(tmp_path)


def test_classes_are_shared_by_the_splits(tmp_path):
    write_shard(tmp_path / "train" / "00000.tar", samples(["a", "b"], label="txt", values=["cat", "dog"]))
    write_shard(tmp_path / "test" / "00000.tar", samples(["c"], label="txt", values=["owl"]))
    train, test = index_of(tmp_path, "train"), index_of(tmp_path, "test")
    assert train.classes == test.classes == ["cat", "dog", "owl"] and list(test.labels) == [2]
    assert train.root == tmp_path / "train"


def test_mixed_indices_and_names_are_refused(tmp_path):
    write_shard(tmp_path / "00000.tar", samples(["a", "b", "c"], label="cls", values=[0, 1, 1])
                + samples(["d"], label="txt", values=["dog"], seed=3))
    with pytest.raises(DataError, match=r"sample 'd' has the label 'dog' but other labels are like '0'"):
        index_of(tmp_path)


@pytest.mark.parametrize("member, content, message", [
    ("x.cls", "cat", r"member x\.cls holds 'cat', expected a class index"),
    ("x.json", "{not json", r"member x\.json is not JSON"),
    ("x.json", "[1, 2]", r"member x\.json holds a list, expected an object"),
    ("x.json", '{"label": 1.5}', r"x\.json: 'label' is 1\.5, expected a class index"),
    ("x.json", '{"label": -1}', r"x\.json: 'label' is -1, expected a class index"),
    ("x.txt", b"\xff\xfe\xfa", r"member x\.txt is not UTF-8 text"),
    ("\udcffx.cls", "1", r"member name '\\udcffx\.cls' is not UTF-8"),  # raw byte 0xff in the tar header
])
def test_malformed_label_members_are_one_line(tmp_path, member, content, message):
    write_shard(tmp_path / "00000.tar", [("x.png", image_bytes(0)), (member, content)])
    with pytest.raises(DataError, match=message):
        index_of(tmp_path)


# --------------------------------------------------------------------------- what is left out, what is refused


def test_samples_without_image_or_label_are_left_out_and_counted(tmp_path, caplog):
    write_shard(tmp_path / "00000.tar", samples(["a", "b"]) + [
        ("meta.json", json.dumps({"caption": "no image"})),           # no image: metadata only
        ("nolabel.jpg", image_bytes(5, "JPEG")), ("nolabel.json", json.dumps({"caption": "c"})),
        ("c.png", image_bytes(6)), ("c.cls", "2"), ("c.seg.png", image_bytes(7)),  # .seg.png: not the image
        ("._hidden.png", b"resource fork"),
    ])
    with caplog.at_level(logging.INFO, logger="mcpipe.extract.sources.webdataset"):
        index = index_of(tmp_path)
    assert index.ids == ["a", "b", "c"] and list(index.labels) == [0, 1, 2]
    assert "1 samples without an image member were left out" in caplog.text
    assert "1 images without a label" in caplog.text and "'nolabel'" in caplog.text


def test_captions_taken_for_classes_are_warned_about(tmp_path, caplog):
    png = image_bytes(0, size=2)
    write_shard(tmp_path / "00000.tar", [m for i in range(1002) for m in ((f"{i:05d}.png", png),
                                                                          (f"{i:05d}.txt", f"a photo, number {i}"))])
    with caplog.at_level(logging.WARNING, logger="mcpipe.extract.sources.webdataset"):
        assert len(index_of(tmp_path).classes) == 1002
    assert "1002 classes" in caplog.text and "are the labels captions?" in caplog.text


def test_a_split_without_any_label_is_refused_with_a_hint(tmp_path):
    write_shard(tmp_path / "00000.tar", [("a.jpg", image_bytes(0, "JPEG")), ("a.txt", ""),
                                         ("a.json", json.dumps({"caption": "a cat"}))])
    with pytest.raises(DataError, match=r"none of its 1 images has a label .*save_additional_columns"):
        index_of(tmp_path)


def test_duplicates_are_refused(tmp_path):
    write_shard(tmp_path / "00000.tar", samples(["a", "b"]))
    write_shard(tmp_path / "00001.tar", samples(["c", "a"]))
    with pytest.raises(DataError, match=r"sample key 'a' is in both .*00000.tar and .*00001.tar"):
        index_of(tmp_path)
    twice = tmp_path / "twice"
    write_shard(twice / "00000.tar", samples(["a"]) + [("a.png", image_bytes(9))])
    with pytest.raises(DataError, match=r"member a\.png appears twice"):
        index_of(twice)
    two = tmp_path / "two"
    write_shard(two / "00000.tar", samples(["a"]) + [("a.jpg", image_bytes(9, "JPEG"))])
    with pytest.raises(DataError, match=r"sample 'a' has 2 images \(\.png, \.jpg\), expected one"):
        index_of(two)


def test_split_layouts(tmp_path):
    flat = tmp_path / "flat"  # img2dataset's output folder
    for i in range(2):
        write_shard(flat / f"{i:05d}.tar", samples([f"{i}{k}" for k in range(2)]))
    (flat / "00000.parquet").write_bytes(b"PAR1")
    (flat / "00000_stats.json").write_text("{}")
    assert available_splits(DataConfig(source="webdataset", root=str(flat))) == ["train"]
    assert len(index_of(flat)) == 4

    named = tmp_path / "named"
    for name in ("test-000.tar", "train-000000.tar", "train-000001.tar", "val_0.tar", "extra.tar"):
        write_shard(named / name, samples([f"{name[:3]}{name[-5]}{k}" for k in range(2)]))
    assert available_splits(DataConfig(source="webdataset", root=str(named))) == ["train", "val", "test", "extra"]
    assert len(index_of(named, "train")) == 4 and index_of(named, "test").root == named

    folders = tmp_path / "folders"
    for split in ("test", "train"):
        write_shard(folders / split / "00000.tar", samples([f"{split}{k}" for k in range(2)]))
    (folders / "notes").mkdir()
    assert available_splits(DataConfig(source="webdataset", root=str(folders))) == ["train", "test"]
    with pytest.raises(DataError, match=r"webdataset has no split 'val' under .*; available splits: train, test"):
        index_of(folders, "val")


@pytest.mark.parametrize("files, message", [
    (["00000.tar", "test-00000.tar"], r"mixes numbered shards \(00000\.tar, split train\) with named ones "
                                      r"\(test-00000\.tar\)"),
    (["00000.tar", "train/00000.tar"], r"has shards both in itself \(00000\.tar\) and in split folders "
                                       r"\(train/00000\.tar\): keep one layout"),
    (["a/readme.txt"], r"no \.tar shards in .* or in its sub-folders$"),
    (["00000.tar.gz"], r"no \.tar shards .*compressed shards \(00000\.tar\.gz\) are not read"),
])
def test_ambiguous_or_empty_layouts_are_one_line(tmp_path, files, message):
    for name in files:
        if name.endswith(".tar"):
            write_shard(tmp_path / name, samples([name.replace("/", "_").split(".")[0]]))
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"x")
    with pytest.raises(DataError, match=message):
        index_of(tmp_path)


def test_truncated_or_corrupt_shards_are_one_line_naming_the_shard(tmp_path):
    path = write_shard(tmp_path / "good.tar", samples(["a", "b", "c"]))
    with tarfile.open(path) as tar:
        third = tar.getmember("c.png").offset  # its header
    good = path.read_bytes()
    path.unlink()
    cases = {
        "truncated": good[: len(good) // 2 + 100],
        "garbage": os.urandom(3000),
        "empty": b"",
        # the third sample's header damaged: tarfile alone would stop there quietly, as at the end
        "bad-header": good[:third] + b"\x01" * 512 + good[third + 512:],
    }
    for name, data in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "00000.tar").write_bytes(data)
        with pytest.raises(DataError, match=rf"{folder / '00000.tar'} (is not a readable tar shard|is corrupt)"):
            index_of(folder)


def test_a_scan_is_kept_on_disk_until_the_shard_changes(tmp_path, scan_cache, monkeypatch):
    shard = write_shard(tmp_path / "data" / "00000.tar", samples(["a", "b"], label="txt", values=["cat", "dog"]))
    first = index_of(tmp_path / "data")
    assert len(list(scan_cache.glob("*.json"))) == 1

    def no_scan(f, path):
        raise AssertionError(f"{path} scanned again")

    monkeypatch.setattr(tar_shards, "_SCANS", {})
    with monkeypatch.context() as m:
        m.setattr(tar_shards, "_scan", no_scan)
        again = index_of(tmp_path / "data")  # another process: from the disk cache
    assert again.ids == first.ids and again.fingerprint() == first.fingerprint()
    assert np.array_equal(again.members.offset, first.members.offset) and again.load(1).size == (20, 20)

    write_shard(shard, samples(["a", "b", "c"], label="txt", values=["cat", "dog", "owl"]))
    os.utime(shard, ns=(1, 1))  # a new modification time: a new entry
    assert index_of(tmp_path / "data").classes == ["cat", "dog", "owl"]
    for entry in scan_cache.glob("*.json"):
        entry.write_text("{broken")
    monkeypatch.setattr(tar_shards, "_SCANS", {})
    assert index_of(tmp_path / "data").ids == ["a", "b", "c"]  # an unreadable entry: scanned again
    (tmp_path / "not-a-folder").write_text("")  # a cache that cannot be written: still works
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    monkeypatch.setattr(tar_shards, "_SCANS", {})
    assert index_of(tmp_path / "data").ids == ["a", "b", "c"]


# --------------------------------------------------------------------------- images


def test_bad_image_members_are_skipped_like_bad_files(tmp_path):
    png = image_bytes(1)
    write_shard(tmp_path / "00000.tar", samples(["ok"]) + [
        ("noise.jpg", os.urandom(300)), ("noise.cls", "1"),
        ("cut.png", png[: len(png) // 2]), ("cut.cls", "2"),
        ("empty.png", b""), ("empty.cls", "0"),
    ])
    index = index_of(tmp_path)
    assert index.ids == ["ok", "noise", "cut", "empty"]
    reasons = []
    for i in range(1, 4):
        with pytest.raises(ImageSkip) as caught:
            index.load(i)
        reasons.append(caught.value.reason)
    assert reasons == ["corrupt", "truncated", "empty"]

    res = extract(tmp_path / "out", tmp_path)
    assert res.exit_code == 0, res.output
    assert "3 skipped (1 corrupt, 1 empty, 1 truncated)" in res.stdout
    assert sorted(open_store(tmp_path / "out" / "train.h5").skipped) == [
        ("cut", "truncated"), ("empty", "empty"), ("noise", "corrupt")]


def test_a_shard_changed_after_indexing_skips_its_images(tmp_path):
    write_shard(tmp_path / "00000.tar", samples(["a", "b"]))
    index = index_of(tmp_path)
    (tmp_path / "00000.tar").write_bytes((tmp_path / "00000.tar").read_bytes()[:600])
    with pytest.raises(ImageSkip, match="truncated"):
        index.load(1)
    (tmp_path / "00000.tar").unlink()
    with pytest.raises(ImageSkip, match="missing: shard 00000.tar is gone"):
        index.load(0)


def test_forked_dataloader_workers_read_the_same_images(tmp_path):
    for s in range(3):
        write_shard(tmp_path / f"{s:05d}.tar", samples([f"{s}-{k}" for k in range(5)], seed=10 * s))
    index = index_of(tmp_path).take(np.array([14, 0, 7, 3, 9, 12]))
    assert index.ids == ["2-4", "0-0", "1-2", "0-3", "1-4", "2-2"]
    dataset = IndexImages(index, eval_transform(preprocess_for("resnet18", 32)), image_size=32, min_size=36)
    one = [t for _, t, _, _ in DataLoader(dataset, batch_size=2, num_workers=0)]
    two = [t for _, t, _, _ in DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork")]
    assert all((a == b).all() for a, b in zip(one, two)) and len(one) == 3


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def folder_and_shards(tmp_path_factory):
    """The same 3 x 6 train and 3 x 2 test images as an imagefolder and as shards (4 per shard)."""
    root = tmp_path_factory.mktemp("wds")
    images = make_noisy_colour_images(root / "images", {"train": 6, "test": 2})
    jpeg = images / "train" / "c1" / "5.png"  # one JPEG, decoded with draft() in both layouts
    Image.open(jpeg).save(jpeg.with_suffix(".jpg"), quality=90)
    jpeg.unlink()
    shards = root / "shards"
    for split in ("train", "test"):
        shards_from_folder(images / split, shards, per_shard=4, name=f"{split}-{{:03d}}.tar")
    return images, shards


@pytest.mark.slow
def test_extract_gives_the_features_of_the_same_images_in_an_imagefolder(folder_and_shards, tmp_path):
    images, shards = folder_and_shards
    res = extract(tmp_path / "wds", shards)
    assert res.exit_code == 0, res.output
    assert "train: 18 rows" in res.stdout and "test: 6 rows" in res.stdout and "0 skipped" in res.stdout
    keys = (*TINY, "data.source=imagefolder", f"data.root={images}")
    res = CliRunner().invoke(app, ["extract", "--no-progress", "--out", str(tmp_path / "folder"),
                                   *[a for k in keys for a in ("--set", k)]])
    assert res.exit_code == 0, res.output
    for split in ("train", "test"):
        a, b = open_store(tmp_path / "wds" / f"{split}.h5"), open_store(tmp_path / "folder" / f"{split}.h5")
        assert a.ids == [i.rsplit(".", 1)[0] for i in b.ids] and a.classes == b.classes == ["c0", "c1", "c2"]
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.features, b.features)
        assert a.attrs["dataset"] == "webdataset" and a.attrs["data_root"] == str(shards)
    # the report finds the images behind the store's ids by rebuilding the index
    from mcpipe.report.images import load_images

    thumbs, why = load_images(tmp_path / "wds" / "train.h5", ["c1/5", "c0/0", "nope"])
    assert why is None and thumbs[0].shape == (24, 24, 3) and thumbs[2] is None
    # a second run finds the work done; data.limit takes a subset of rows through take()
    assert "complete already" in extract(tmp_path / "wds", shards).stdout
    res = extract(tmp_path / "lim", shards, "data.limit=5", 'data.splits=["train"]')
    assert res.exit_code == 0, res.output
    lim, full = open_store(tmp_path / "lim" / "train.h5"), open_store(tmp_path / "wds" / "train.h5")
    rows = [full.ids.index(i) for i in lim.ids]
    np.testing.assert_array_equal(lim.features, full.features[rows])


def test_extract_refusals_are_one_line(tmp_path):
    line = one_line_error(extract(tmp_path / "o", tmp_path / "nope"))
    assert "data.root" in line and "nope" in line and "is not a folder" in line
    (tmp_path / "empty").mkdir()
    assert "no .tar shards in" in one_line_error(extract(tmp_path / "o", tmp_path / "empty"))
    write_shard(tmp_path / "data" / "00000.tar", samples(["a", "b"]))
    line = one_line_error(extract(tmp_path / "o", tmp_path / "data", 'data.splits=["test"]'))
    assert "webdataset has no split 'test'" in line and "available splits: train" in line
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "00000.tar").write_bytes((tmp_path / "data" / "00000.tar").read_bytes()[:700])
    line = one_line_error(extract(tmp_path / "o", tmp_path / "cut"))
    assert "00000.tar is not a readable tar shard" in line
    assert not (tmp_path / "o").exists()


def test_finetune_trains_on_shards(folder_and_shards, tmp_path):
    _, shards = folder_and_shards
    keys = ("data.source=webdataset", f"data.root={shards}", "extract.backbone=resnet18", "extract.weights=none",
            "extract.image_size=32", "finetune.batch_size=6", "finetune.epochs=1", "finetune.workers=0",
            "finetune.device=cpu", "cleaner.subset_size=2", "cleaner.hidden=8")
    res = CliRunner().invoke(app, ["finetune", "--no-progress", "--log-level", "warning", "--out",
                                   str(tmp_path / "run"), *[a for k in keys for a in ("--set", k)]])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history"][0]["test_images"] == 6 and 0 <= metrics["test_accuracy"] <= 1


@pytest.mark.slow
def test_extract_killed_after_a_block_resumes_to_the_uninterrupted_store(tmp_path):
    images = make_noisy_colour_images(tmp_path / "images", {"train": 20}, size=40)
    shards = shards_from_folder(images / "train", tmp_path / "shards", per_shard=7)

    def cmd(out: Path) -> list[str]:
        keys = (*TINY, "extract.batch_size=2", "store.sync_seconds=0", "data.source=webdataset",
                f"data.root={shards}")
        return mcpipe("extract", "--no-progress", "--log-level", "debug", "--out", str(tmp_path / out),
                      *[a for k in keys for a in ("--set", k)])

    assert run(cmd("ref"), tmp_path).returncode == 0
    kill9_at(cmd("part"), tmp_path, pattern="committed blocks", count=1, delay=0.0)
    partial = open_store(tmp_path / "part" / "train.h5", allow_incomplete=True)
    assert not partial.complete and 2 <= len(partial.ids) < 60
    res = run(cmd("part"), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_store(tmp_path / "ref" / "train.h5", tmp_path / "part" / "train.h5")
