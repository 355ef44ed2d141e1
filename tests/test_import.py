"""mcpipe import: stores from existing embeddings (.npy + labels CSV/TSV, clip-retrieval), provenance, refusals."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import invoke
from fixtures_data import class_color, write_image
from mcpipe import importer
from mcpipe.store.reader import open_store, read_paths

CLASSES = ["bird", "cat", "dog"]


def make(tmp_path, n=90, dim=8, *, parts=1, seed=0, name="emb", dtype=np.float32, split_ids="s"):
    """Clustered embeddings in ``parts`` .npy files and a labels.csv for them; returns (npys, csv, x, labels)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).standard_normal((3, dim)) * 3
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.standard_normal((n, dim))).astype(dtype)
    npys = []
    for k, rows in enumerate(np.array_split(np.arange(n), parts)):
        p = tmp_path / f"{name}{k}.npy"
        np.save(p, x[rows])
        npys.append(p)
    csv = tmp_path / f"{name}.csv"
    lines = ["id,label,clean_label,path"]
    for i in range(n):
        clean = CLASSES[y[i]] if i % 3 else ""
        lines.append(f"{split_ids}{i:04d},{CLASSES[y[i]]},{clean},img/{i}.jpg")
    csv.write_text("\n".join(lines) + "\n")
    return npys, csv, x, y


def emb_args(npys):
    out = []
    for p in npys:
        out += ["--embeddings", p]
    return out


def refused(res, *texts):
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for t in texts:
        assert t in lines[0], (t, lines[0])


def test_import_round_trips_and_trains(tmp_path):
    npys, csv, x, y = make(tmp_path, parts=2)
    out = tmp_path / "feats"
    res = invoke("import", "--out", out, *emb_args(npys), "--labels", csv, "--dtype", "float32")
    assert res.exit_code == 0, res.output
    s = open_store(out / "train.h5")
    assert s.classes == CLASSES
    np.testing.assert_array_equal(s.features, x)
    np.testing.assert_array_equal(s.labels, y)
    assert s.ids == [f"s{i:04d}" for i in range(90)]
    expected_clean = np.where(np.arange(90) % 3 == 0, -1, y)
    np.testing.assert_array_equal(s.clean_labels, expected_clean)
    assert s.attrs["backbone"] == "imported" and s.attrs["split"] == "train"
    # the path column is kept, made absolute against the labels file's folder (the images need not exist)
    assert read_paths(s) == [str(tmp_path / "img" / f"{i}.jpg") for i in range(90)]
    res = invoke("inspect", out / "train.h5")  # the plain-text summary too, with no preprocessing to show
    assert res.exit_code == 0 and "none (features not extracted by mcpipe)" in res.output, res.output

    # provenance: every input file with its sha256
    sources = json.loads(s.attrs["import_sources"])
    by_path = {src["path"]: src for src in sources}
    for p in (*npys, csv):
        assert by_path[str(p.resolve())]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert {src["role"] for src in sources} == {"embeddings", "labels"}

    # a test split takes train.h5's classes (here only two of them occur)
    tn, tcsv, tx, ty = make(tmp_path, n=30, seed=1, name="test", split_ids="t")
    keep = ty != 0
    np.save(tn[0], tx[keep])
    lines = tcsv.read_text().splitlines()
    tcsv.write_text("\n".join([lines[0]] + [l for l, k in zip(lines[1:], keep) if k]) + "\n")
    res = invoke("import", "--out", out, "--split", "test", *emb_args(tn), "--labels", tcsv, "--dtype", "float32")
    assert res.exit_code == 0, res.output
    t = open_store(out / "test.h5")
    assert t.classes == CLASSES and (t.labels == ty[keep]).all()

    run = tmp_path / "run"
    res = invoke("train-head", "--features", out, "--out", run, "--set", "train.auto=false", "--set", "train.epochs=2",
                 "--set", "train.batch_size=32", "--set", "cleaner.hidden=16", "--set", "train.device=cpu",
                 "--set", "cleaner.score_repeats=2", "--set", "cleaner.knn_k=5")
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output
    assert (run / "metrics.json").is_file()


def test_tsv_classes_file_and_overwrite(tmp_path):
    npys, _, x, y = make(tmp_path, n=12)
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("id\tlabel\n" + "".join(f"r{i}\t{CLASSES[y[i]]}\n" for i in range(12)))
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\nbird\nfish\n")
    out = tmp_path / "f"
    assert invoke("import", "--out", out, *emb_args(npys), "--labels", tsv, "--classes", classes).exit_code == 0
    s = open_store(out / "train.h5")
    assert s.classes == ["dog", "cat", "bird", "fish"] and s.dtype == "float16"
    assert not s.has_paths and read_paths(s) is None  # no path column: no paths dataset
    with h5py.File(out / "train.h5", "r") as f:
        assert "paths" not in f
    assert [s.classes[k] for k in s.labels] == [CLASSES[k] for k in y]
    assert (s.clean_labels == -1).all()
    before = (out / "train.h5").read_bytes()
    refused(invoke("import", "--out", out, *emb_args(npys), "--labels", tsv), "exists", "--overwrite")
    assert (out / "train.h5").read_bytes() == before
    assert invoke("import", "--out", out, *emb_args(npys), "--labels", tsv, "--overwrite").exit_code == 0
    assert open_store(out / "train.h5").classes == CLASSES


def _csv_with(tmp_path, header, rows):
    p = tmp_path / "bad.csv"
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


@pytest.mark.parametrize("case", ["rows", "dims", "ndim", "int", "nan", "inf", "dup", "columns", "unknown",
                                  "test_without_classes", "float16_overflow", "both_sources"])
def test_refusals(case, tmp_path):
    npys, csv, x, y = make(tmp_path, n=10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    extra: list = []
    expect: tuple = ()
    if case == "rows":
        csv = _csv_with(tmp_path, "id,label", [f"a{i},cat" for i in range(9)])
        expect = ("10 rows", "has 9")
    elif case == "dims":
        p = tmp_path / "other.npy"
        np.save(p, np.zeros((3, 5), np.float32))
        npys = [*npys, p]
        csv = _csv_with(tmp_path, "id,label", [f"a{i},cat" for i in range(13)])
        expect = ("different dimensions",)
    elif case == "ndim":
        np.save(npys[0], np.zeros((10, 2, 2), np.float32))
        expect = ("2-D",)
    elif case == "int":
        np.save(npys[0], np.zeros((10, 8), np.int64))
        expect = ("int64", "floating point")
    elif case in ("nan", "inf"):
        x[4, 2] = np.nan if case == "nan" else np.inf
        np.save(npys[0], x)
        expect = ("NaN or infinite", "row 4")
    elif case == "dup":
        csv = _csv_with(tmp_path, "id,label", [f"a{i % 9},cat" for i in range(10)])
        expect = ("'a0'", "more than once")
    elif case == "columns":
        csv = _csv_with(tmp_path, "name,label", [f"a{i},cat" for i in range(10)])
        expect = ("lacks the column(s) id",)
    elif case == "unknown":
        classes = tmp_path / "classes.txt"
        classes.write_text("cat\ndog\n")
        extra = ["--classes", classes]
        expect = ("'bird'", "not in the class list")
    elif case == "test_without_classes":
        extra = ["--split", "test"]
        expect = ("train split's classes", "--classes")
    elif case == "float16_overflow":
        x[1, 1] = 1e6
        np.save(npys[0], x)
        expect = ("float16", "--dtype float32")
    elif case == "both_sources":
        extra = ["--clip-retrieval", tmp_path]
        expect = ("--clip-retrieval",)
    res = invoke("import", "--out", out, *emb_args(npys), "--labels", csv, *extra)
    refused(res, *expect)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _clip_layout(tmp_path, n_parts=2, rows=8, dim=6):
    root = tmp_path / "clip"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    rng = np.random.default_rng(3)
    tables, xs = {}, []
    for i in range(n_parts):
        x = rng.standard_normal((rows, dim)).astype(np.float32)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x)
        meta = root / "metadata" / f"metadata_{i}.parquet"
        meta.write_bytes(f"fake parquet {i}".encode())
        tables[meta.name] = {"image_path": [f"part{i}/{r}.jpg" for r in range(rows)],
                             "species": [CLASSES[(r + i) % 3] for r in range(rows)]}
        xs.append(x)
    return root, tables, np.concatenate(xs)


def test_clip_retrieval_layout(tmp_path, monkeypatch):
    """The layout logic, with the parquet reader stubbed (pyarrow is optional and may be missing)."""
    root, tables, x = _clip_layout(tmp_path)

    def fake_read(path, columns):
        t = tables[path.name]
        missing = [c for c in columns if c not in t]
        if missing:
            raise importer.DataError(f"metadata file {path} lacks column(s) {', '.join(missing)}")
        return {c: t[c] for c in columns}

    monkeypatch.setattr(importer, "_read_parquet", fake_read)
    out = tmp_path / "f"
    res = invoke("import", "--out", out, "--clip-retrieval", root, "--label-column", "species", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    s = open_store(out / "train.h5")
    np.testing.assert_array_equal(s.features, x)
    assert s.ids[:2] == ["part0/0.jpg", "part0/1.jpg"] and s.ids[8] == "part1/0.jpg"
    assert s.classes == CLASSES and s.attrs["dataset"] == "clip-retrieval"
    # image_path is the id and the image file: relative ones are taken relative to the clip-retrieval folder
    assert read_paths(s)[:2] == [str(root.resolve() / "part0" / "0.jpg"), str(root.resolve() / "part0" / "1.jpg")]
    roles = sorted(src["role"] for src in json.loads(s.attrs["import_sources"]))
    assert roles == ["embeddings", "embeddings", "metadata", "metadata"]

    refused(invoke("import", "--out", tmp_path / "g", "--clip-retrieval", root), "lacks column(s) label")
    (root / "metadata" / "metadata_1.parquet").unlink()
    refused(invoke("import", "--out", tmp_path / "g", "--clip-retrieval", root, "--label-column", "species"),
            "part 1 lacks metadata_1.parquet")


def test_clip_retrieval_without_pyarrow_is_one_line(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed")
    root, _, _ = _clip_layout(tmp_path, n_parts=1)
    refused(invoke("import", "--out", tmp_path / "f", "--clip-retrieval", root), "pip install pyarrow")
    assert not (tmp_path / "f").exists()


HEAD = ["--set", "train.auto=false", "--set", "train.epochs=2", "--set", "train.batch_size=32",
        "--set", "cleaner.hidden=16", "--set", "train.device=cpu", "--set", "cleaner.score_repeats=2",
        "--set", "cleaner.knn_k=5", "--no-progress"]


def _png_drawn(path):
    assert path.is_file() and path.stat().st_size > 5000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and np.asarray(img.convert("L")).std() > 5, path


@pytest.mark.slow
def test_image_paths_reach_the_report(tmp_path):
    """A path column -- relative to the labels file (here with ..) or absolute -- is kept in the store, and
    the report of a run on it draws the suspect images; without one it says in one line why it cannot."""
    npys, _, x, y = make(tmp_path, n=60)
    images = tmp_path / "images"
    for i in range(60):
        write_image(images / f"{i}.png", size=(24, 24), color=class_color(int(y[i])))
    labels = tmp_path / "meta" / "labels.csv"
    labels.parent.mkdir()
    rows = [f"s{i:04d},{CLASSES[y[i]]},{CLASSES[y[i]]},"
            + (str(images / f"{i}.png") if i % 2 else f"../images/{i}.png") for i in range(60)]
    labels.write_text("\n".join(["id,label,clean_label,path", *rows]) + "\n")
    out = tmp_path / "feats"
    res = invoke("import", "--out", out, *emb_args(npys), "--labels", labels)
    assert res.exit_code == 0, res.output
    s = open_store(out / "train.h5")
    assert s.has_paths and read_paths(s) == [str(images / f"{i}.png") for i in range(60)]
    res = invoke("inspect", out / "train.h5", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["image_paths"] is True, res.output

    run = tmp_path / "run"
    res = invoke("train-head", "--features", out, "--out", run, *HEAD)
    assert res.exit_code == 0, res.output
    res = invoke("report", run, "--out", tmp_path / "r", "--suspects", "12")
    assert res.exit_code == 0, res.output
    assert "suspect images not shown" not in res.output, res.output
    _png_drawn(tmp_path / "r" / "suspects.png")

    # the same run against a store imported without a path column: one line, no contact sheet
    bare = tmp_path / "bare"
    plain = tmp_path / "plain.csv"
    plain.write_text("id,label\n" + "".join(f"s{i:04d},{CLASSES[y[i]]}\n" for i in range(60)))
    assert invoke("import", "--out", bare, *emb_args(npys), "--labels", plain).exit_code == 0
    res = invoke("report", run, "--out", tmp_path / "r2", "--features", bare)
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if "suspect images not shown" in line]
    assert len(notes) == 1 and "records no image paths" in notes[0] and "path column" in notes[0], res.output
    assert not (tmp_path / "r2" / "suspects.png").exists()

    # paths that do not resolve (the images moved): the report says so, as for missing images
    for f in images.iterdir():
        f.rename(tmp_path / f.name)
    res = invoke("report", run, "--out", tmp_path / "r3")
    assert res.exit_code == 0, res.output
    assert "suspect images not shown" in res.output and "none of the suspect images was found" in res.output
    assert not (tmp_path / "r3" / "suspects.png").exists()


def test_store_without_paths_opens_and_bad_paths_are_refused(tmp_path):
    """A store written before the paths dataset existed still opens; a paths dataset of the wrong shape is refused."""
    npys, csv, _, _ = make(tmp_path, n=12)
    out = tmp_path / "f"
    assert invoke("import", "--out", out, *emb_args(npys), "--labels", csv).exit_code == 0
    with h5py.File(out / "train.h5", "r+") as f:
        del f["paths"]  # as written before this version
    s = open_store(out / "train.h5")
    assert len(s.ids) == 12 and not s.has_paths and read_paths(s) is None
    with h5py.File(out / "train.h5", "r+") as f:
        f.create_dataset("paths", data=np.array(["a.png"] * 5, dtype=object), dtype=h5py.string_dtype("utf-8"))
    with pytest.raises(importer.DataError, match=r"has paths of shape \(5,\).*expected \(12,\) strings"):
        open_store(out / "train.h5")
