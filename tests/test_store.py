"""Feature store: round trip, resume by blocks, refusals of the reader and writer."""

from __future__ import annotations

import multiprocessing as mp

import h5py
import numpy as np
import pytest

from mcpipe.errors import DataError
from mcpipe.store.reader import open_store
from mcpipe.store.schema import SCHEMA_VERSION, SKIP_REASONS
from mcpipe.store.summary import describe
from mcpipe.store.writer import StoreSpec, StoreWriter


def make_spec(n=10, d=6, *, block_rows=4, dtype="float16", source="src-a", config="cfg-a", classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(classes), n)
    clean = labels.copy()
    clean[::3] = -1
    return StoreSpec(
        ids=[f"img/{i:03d}.jpg" for i in range(n)], labels=labels, clean_labels=clean, feature_dim=d, dtype=dtype,
        block_rows=block_rows, chunk_rows=3,
        attrs={
            "mcpipe_version": "test", "dataset": "unit", "split": "train",
            "class_names": np.array(classes, dtype=h5py.string_dtype()), "backbone": "resnet18",
            "weights": "none", "weights_sha256": "", "random_init": True, "image_size": 32,
            "preprocessing": "{}", "source_fingerprint": source, "config_fingerprint": config,
            "precision": "fp32", "device": "cpu", "data_root": "/data",
        },
    )


def block_features(spec, b):
    start = b * spec.block_rows
    stop = min(start + spec.block_rows, spec.num_rows)
    return np.arange(start * spec.feature_dim, stop * spec.feature_dim, dtype=np.float32).reshape(-1, spec.feature_dim) / 7


def fill(path, spec, blocks=None, skip=None):
    with StoreWriter.open(path, spec, sync_seconds=0) as w:
        for b in (w.pending_blocks() if blocks is None else blocks):
            feats = block_features(spec, b)
            codes = np.zeros(len(feats), np.uint8)
            if skip and b in skip:
                codes[0] = SKIP_REASONS.index(skip[b])
                feats[0] = 0
            w.write_block(b, feats, codes)
    return path


def test_round_trip(tmp_path):
    spec = make_spec(n=10, block_rows=4)
    fill(tmp_path / "s.h5", spec)
    s = open_store(tmp_path / "s.h5")
    assert s.complete and s.num_rows == 10 and s.feature_dim == 6 and s.dtype == "float16"
    expected = np.concatenate([block_features(spec, b) for b in range(3)]).astype(np.float16)
    np.testing.assert_array_equal(s.features, expected)
    np.testing.assert_array_equal(s.labels, spec.labels)
    np.testing.assert_array_equal(s.clean_labels, spec.clean_labels)
    assert s.ids == spec.ids and s.classes == ["a", "b", "c"]
    assert s.attrs["schema_version"] == SCHEMA_VERSION and s.attrs["random_init"] is True
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["features"].chunks == (3, 6)  # row-chunked


def test_float32_on_request(tmp_path):
    spec = make_spec(dtype="float32")
    s = open_store(fill(tmp_path / "s.h5", spec))
    assert s.features.dtype == np.float32


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    spec = make_spec(n=11, block_rows=3)
    fill(tmp_path / "full.h5", spec)
    fill(tmp_path / "part.h5", spec, blocks=[0, 2])  # "interrupted" after blocks 0 and 2
    with pytest.raises(DataError, match="incomplete: 6 of 11 rows"):
        open_store(tmp_path / "part.h5")
    partial = open_store(tmp_path / "part.h5", allow_incomplete=True)
    assert len(partial.ids) == 6 and not partial.complete
    with StoreWriter.open(tmp_path / "part.h5", spec) as w:
        assert w.pending_blocks() == [1, 3]  # only the missing blocks are redone
        w.close()
    fill(tmp_path / "part.h5", spec)
    a, b = open_store(tmp_path / "full.h5"), open_store(tmp_path / "part.h5")
    np.testing.assert_array_equal(a.features, b.features)
    with h5py.File(tmp_path / "full.h5") as fa, h5py.File(tmp_path / "part.h5") as fb:
        for name in ("features", "labels", "clean_labels", "written", "skipped"):
            np.testing.assert_array_equal(fa[name][:], fb[name][:])
        assert fb.attrs["complete"]


def test_unflagged_block_is_redone(tmp_path):
    """Features written but never committed (a kill before the fsync) count as missing."""
    spec = make_spec(n=8, block_rows=4)
    w = StoreWriter.open(tmp_path / "s.h5", spec, sync_seconds=3600)
    w.write_block(0, block_features(spec, 0), np.zeros(4, np.uint8))
    w._f.close()  # simulate dying without commit: no flags set, and the lock goes with the process
    w._lock.release()
    with StoreWriter.open(tmp_path / "s.h5", spec) as w2:
        assert w2.pending_blocks() == [0, 1]


def test_skipped_rows_are_recorded_and_left_out(tmp_path):
    spec = make_spec(n=8, block_rows=4)
    fill(tmp_path / "s.h5", spec, skip={1: "corrupt"})
    s = open_store(tmp_path / "s.h5")
    assert s.complete and len(s.ids) == 7 and "img/004.jpg" not in s.ids
    assert s.skipped == [("img/004.jpg", "corrupt")]
    summary = describe(s)
    assert summary["skipped_by_reason"] == {"corrupt": 1} and summary["usable_rows"] == 7


def test_resume_refused_for_other_data_or_config(tmp_path):
    path = fill(tmp_path / "s.h5", make_spec(n=8))
    before = path.read_bytes()
    with pytest.raises(DataError, match="written from other data.*source_fingerprint.*--overwrite"):
        StoreWriter.open(path, make_spec(n=8, source="src-b"))
    with pytest.raises(DataError, match="written with another extraction config.*--overwrite"):
        StoreWriter.open(path, make_spec(n=8, config="cfg-b"))
    assert path.read_bytes() == before  # nothing damaged
    StoreWriter.open(path, make_spec(n=8, config="cfg-b"), overwrite=True).close()
    assert open_store(path, allow_incomplete=True).attrs["config_fingerprint"] == "cfg-b"


def _hold_open(path, ready, release):
    spec = make_spec(n=8)
    w = StoreWriter.open(path, spec)
    ready.set()
    release.wait(20)
    w.close()


@pytest.mark.slow
def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_open, args=(path, ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(DataError, match="another process"):
            StoreWriter.open(path, make_spec(n=8))
        with pytest.raises(DataError, match="another process"):
            open_store(path)
    finally:
        release.set()
        p.join(30)


def _corrupt(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.__delitem__("labels"), "lacks dataset.*labels"),
        (lambda f: f.attrs.__setitem__("schema_version", 99), "schema version 99"),
        (lambda f: f.attrs.__delitem__("backbone"), "lacks attribute.*backbone"),
        (lambda f: f["labels"].__setitem__(0, 7), r"labels in \[0, 7\] but 3 classes"),
        (lambda f: f["clean_labels"].__setitem__(0, -5), r"clean labels in \[-5"),
        (lambda f: f["features"].__setitem__((5, 2), np.nan), "NaN or infinite features.*row 5"),
        (lambda f: f["features"].__setitem__((1, 0), np.inf), "NaN or infinite features.*row 1"),
        (lambda f: f["written"].__setitem__(3, False), "incomplete: 7 of 8"),
        (lambda f: (f.__delitem__("written"), f.create_dataset("written", data=np.ones(5, bool))),
         r"written of shape \(5,\)"),
        (lambda f: (f.__delitem__("labels"), f.create_dataset("labels", data=np.zeros(8, np.int32))),
         "labels of shape.*int32"),
    ],
)
def test_reader_refuses(tmp_path, mutate, message):
    path = _corrupt(fill(tmp_path / "s.h5", make_spec(n=8)), mutate)
    with pytest.raises(DataError, match=message):
        open_store(path)


def test_reader_refuses_non_stores(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_store(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DataError, match="not an HDF5 file"):
        open_store(tmp_path / "text.h5")
    with pytest.raises(DataError, match="is a folder"):
        open_store(tmp_path)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="lacks dataset"):
        open_store(tmp_path / "other.h5")
