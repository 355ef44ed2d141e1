"""FAISS kNN graph: exact = brute force, approximate recall, agreement finds planted flips, the cache."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mcpipe.cleaner import knn
from mcpipe.cleaner.noise import apply_noise
from mcpipe.errors import DataError
from mcpipe.store.reader import FeatureRows, FeatureStore, open_store, read_features
from mcpipe.store.synthetic import write_synthetic_store


def clustered(m=2000, d=32, c=10, spread=0.8, seed=0, dtype=np.float32):
    """Gaussian clusters: (features, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((c, d))
    labels = rng.integers(0, c, m)
    return (centres[labels] + spread * rng.standard_normal((m, d))).astype(dtype), labels


def brute_force(x, k, rows=None):
    """Top-k cosine neighbours of rows among rows (global indices), self excluded."""
    rows = np.arange(len(x)) if rows is None else rows
    u = x[rows].astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return rows[order], np.take_along_axis(sim, order, axis=1)


def recall(found, truth):
    return np.mean([len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth)])


def cosine_of(x, graph):
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return np.einsum("id,ikd->ik", u, u[graph.neighbours])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_exact_path_equals_brute_force(dtype):
    x, labels = clustered(m=400, d=16, dtype=dtype)
    g = knn.build_knn(x, labels, k=7)
    idx, sim = brute_force(x, 7)
    np.testing.assert_array_equal(g.neighbours, idx)
    np.testing.assert_allclose(g.similarity, sim, atol=1e-5)
    assert g.neighbours.dtype == np.int64 and g.similarity.dtype == np.float32
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        np.testing.assert_array_equal(g.same_label[rows], brute_force(x, 7, rows)[0])


@pytest.mark.parametrize("d", [32, 300])  # 300 > PCA_DIM: the PCA projection, then re-scoring
def test_approximate_path_recall(d):
    x, labels = clustered(m=3000, d=d, c=12, spread=0.9 if d == 32 else 0.25)
    exact = knn.build_knn(x, labels, k=10)
    approx = knn.build_knn(x, labels, k=10, exact_max=500)  # IVF globally, exhaustive per class (~250 rows)
    assert recall(approx.neighbours, exact.neighbours) >= 0.9
    assert recall(approx.same_label, exact.same_label) >= 0.9
    np.testing.assert_allclose(approx.similarity, cosine_of(x, approx), atol=2e-3)  # cosines, not PCA distances
    assert (np.diff(approx.similarity, axis=1) <= 1e-6).all()  # nearest first
    assert (approx.neighbours != np.arange(len(x))[:, None]).all()


def test_approximate_search_inside_large_classes():
    x, labels = clustered(m=3000, d=24, c=2, spread=1.0, seed=1)
    exact = knn.build_knn(x, labels, k=5)
    approx = knn.build_knn(x, labels, k=5, exact_max=400)  # each class (~1500 rows) gets its own IVF
    assert recall(approx.same_label, exact.same_label) >= 0.9


def test_same_label_neighbours_carry_the_same_label():
    x, labels = clustered(m=1500, d=16, c=6)
    for exact_max in (10_000, 300):
        g = knn.build_knn(x, labels, k=8, k_same=5, exact_max=exact_max)
        assert g.same_label.shape == (1500, 5)
        found = g.same_label >= 0
        assert found.all()
        assert (labels[g.same_label] == labels[:, None]).all()
        assert (g.same_label != np.arange(1500)[:, None]).all()


def test_agreement_separates_planted_flips():
    x, true = clustered(m=3000, d=32, c=10, spread=0.9)
    noisy = apply_noise(true, 10, kind="symmetric", rate=0.3, seed=0)
    graph = knn.build_knn(x, noisy, k=10)
    score = knn.agreement(graph, noisy)
    assert score.shape == (3000,) and 0 <= score.min() and score.max() <= 1
    assert roc_auc_score(noisy == true, score) >= 0.8


@pytest.mark.parametrize("exact_max", [10_000, 2])
def test_padding_for_tiny_sets_and_classes(exact_max):
    x, _ = clustered(m=4, d=8)
    labels = np.array([0, 0, 0, 1])
    g = knn.build_knn(x, labels, k=5, exact_max=exact_max)
    assert (g.neighbours[:, 3:] == -1).all() and np.isnan(g.similarity[:, 3:]).all()
    assert (g.neighbours[:, :3] >= 0).all()
    assert (g.same_label[3] == -1).all()  # alone in its class
    assert (g.same_label[:3, 2:] == -1).all() and (g.same_label[:3, :2] >= 0).all()
    np.testing.assert_allclose(knn.agreement(g, labels), [2 / 3, 2 / 3, 2 / 3, 0.0])


def test_duplicate_rows_are_neighbours_but_self_is_not():
    x, labels = clustered(m=200, d=8)
    x[1] = x[0]
    g = knn.build_knn(x, labels, k=3)
    assert g.neighbours[0, 0] == 1 and g.neighbours[1, 0] == 0
    assert (g.neighbours != np.arange(200)[:, None]).all()


def test_the_build_is_deterministic():
    x, labels = clustered(m=2000, d=16)
    a = knn.build_knn(x, labels, k=5, exact_max=300, seed=3)
    b = knn.build_knn(x, labels, k=5, exact_max=300, seed=3)
    np.testing.assert_array_equal(a.neighbours, b.neighbours)
    np.testing.assert_array_equal(a.same_label, b.same_label)


def test_bad_inputs_are_refused():
    x, labels = clustered(m=50, d=4)
    with pytest.raises(ValueError, match="float16 or float32"):
        knn.build_knn(x.astype(np.float64), labels)
    with pytest.raises(ValueError, match=r"labels must be \(50,\) integers"):
        knn.build_knn(x, labels[:10])
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn.build_knn(x, labels, k=0)


# --------------------------------------------------------------------------- cache


def make_store(tmp_path, x, labels, *, source="src-a", config="cfg-a"):
    m = len(labels)
    return FeatureStore(
        path=tmp_path / "train.h5", features=x, labels=labels, clean_labels=np.full(m, -1),
        ids=[str(i) for i in range(m)], rows=np.arange(m), classes=[f"c{i}" for i in range(labels.max() + 1)],
        attrs={"source_fingerprint": source, "config_fingerprint": config}, num_rows=m, feature_dim=x.shape[1],
        dtype=x.dtype.name, complete=True,
    )


@pytest.fixture
def counted(monkeypatch):
    """Count calls of the two searches load_or_build may run."""
    calls = {"build": 0, "same": 0}
    build, same = knn.neighbours, knn.same_label_knn

    def counting_build(*a, **kw):
        calls["build"] += 1
        return build(*a, **kw)

    def counting_same(*a, **kw):
        calls["same"] += 1
        return same(*a, **kw)

    monkeypatch.setattr(knn, "neighbours", counting_build)
    monkeypatch.setattr(knn, "same_label_knn", counting_same)
    return calls


def test_cache_hit_returns_identical_arrays(tmp_path, counted):
    x, labels = clustered(m=600, d=16, dtype=np.float16)
    store = make_store(tmp_path, x, labels)
    first = knn.load_or_build(store, labels, k=6)
    assert (tmp_path / "train.knn-k6.npz").is_file()
    assert not list(tmp_path.glob(".*.tmp"))
    second = knn.load_or_build(store, labels, k=6)
    assert counted == {"build": 1, "same": 1}
    for name in ("neighbours", "similarity", "same_label"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))


def test_new_labels_reuse_the_neighbours(tmp_path, counted):
    x, labels = clustered(m=600, d=16)
    store = make_store(tmp_path, x, labels)
    first = knn.load_or_build(store, labels, k=6)
    noisy = apply_noise(labels, 10, kind="symmetric", rate=0.3, seed=1)
    second = knn.load_or_build(store, noisy, k=6)
    assert counted == {"build": 1, "same": 2}
    np.testing.assert_array_equal(second.neighbours, first.neighbours)
    np.testing.assert_array_equal(second.same_label, knn.build_knn(x, noisy, k=6).same_label)
    knn.load_or_build(store, noisy, k=6)  # the rewritten cache now holds these labels
    assert counted == {"build": 2, "same": 3}  # (the reference build_knn call above counts once each)


@pytest.mark.parametrize("change", ["k", "source", "config", "rows"])
def test_changed_store_or_k_rebuilds(tmp_path, counted, change):
    x, labels = clustered(m=300, d=8)
    store = make_store(tmp_path, x, labels)
    knn.load_or_build(store, labels, k=4)
    k = 5 if change == "k" else 4
    if change in ("source", "config"):
        store = make_store(tmp_path, x, labels, **{change: "changed"})
    if change == "rows":
        store.rows = store.rows + 1
    g = knn.load_or_build(store, labels, k=k)
    assert counted["build"] == 2 and g.neighbours.shape == (300, k)


def test_corrupt_or_wrong_cache_is_rebuilt(tmp_path, counted, caplog):
    x, labels = clustered(m=300, d=8)
    store = make_store(tmp_path, x, labels)
    good = knn.load_or_build(store, labels, k=4)
    path = tmp_path / "train.knn-k4.npz"
    path.write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="mcpipe.cleaner.knn"):
        again = knn.load_or_build(store, labels, k=4)
    assert "unreadable" in caplog.text and counted["build"] == 2
    np.testing.assert_array_equal(again.neighbours, good.neighbours)
    with np.load(path) as data:  # a right key over wrong arrays is not trusted either
        fields = dict(data)
    fields["neighbours"] = np.full((300, 4), 10**6)
    with open(path, "wb") as f:
        np.savez(f, **fields)
    knn.load_or_build(store, labels, k=4)
    assert counted["build"] == 3


def test_cache_dir(tmp_path):
    x, labels = clustered(m=100, d=8)
    store = make_store(tmp_path, x, labels)
    knn.load_or_build(store, labels, k=3, cache_dir=tmp_path / "cache" / "knn")
    assert (tmp_path / "cache" / "knn" / "train.knn-k3.npz").is_file()


@pytest.mark.parametrize("exact_max", [10_000, 300])
def test_search_streamed_from_the_file_equals_search_in_memory(tmp_path, exact_max):
    path = write_synthetic_store(tmp_path / "train.h5", 1200, 300, 6, block_rows=256)  # 300 > PCA_DIM
    lazy = open_store(path, load_features=False)
    loaded = open_store(path)
    rows = FeatureRows(lazy)
    assert len(rows) == 1200 and rows.shape == loaded.features.shape and rows.dtype == loaded.features.dtype
    np.testing.assert_array_equal(rows[100:700], loaded.features[100:700])
    np.testing.assert_array_equal(read_features(lazy), loaded.features)
    streamed = knn.neighbours(rows, k=5, exact_max=exact_max)
    in_memory = knn.neighbours(loaded.features, k=5, exact_max=exact_max)
    for a, b in zip(streamed, in_memory):
        np.testing.assert_array_equal(a, b)


def test_store_without_features_builds_from_its_file(tmp_path, counted):
    path = write_synthetic_store(tmp_path / "train.h5", 500, 16, 5)
    lazy, loaded = open_store(path, load_features=False), open_store(path)
    nb, sim = knn.load_or_build_neighbours(lazy, k=4)  # written to the cache, same-label part empty
    assert counted == {"build": 1, "same": 0}
    again = knn.load_or_build_neighbours(lazy, k=4)
    np.testing.assert_array_equal(again[0], nb)
    graph = knn.load_or_build(loaded, loaded.labels, k=4)  # neighbours from the cache
    assert counted == {"build": 1, "same": 1}
    reference = knn.build_knn(loaded.features, loaded.labels, k=4)
    for name in ("neighbours", "similarity", "same_label"):
        np.testing.assert_array_equal(getattr(graph, name), getattr(reference, name))


def test_known_neighbours_are_used_when_the_cache_is_missing(tmp_path, counted):
    x, labels = clustered(m=200, d=8)
    store = make_store(tmp_path, x, labels)
    known = knn.neighbours(x, k=3)
    graph = knn.load_or_build(store, labels, k=3, known=known, cache_dir=tmp_path / "elsewhere")
    assert counted == {"build": 1, "same": 1}  # only the call above searched
    np.testing.assert_array_equal(graph.neighbours, known[0])


def test_non_finite_rows_are_refused_while_streaming(tmp_path):
    path = write_synthetic_store(tmp_path / "train.h5", 300, 8, 3)
    with h5py.File(path, "r+") as f:
        f["features"][250, 3] = np.inf
    lazy = open_store(path, load_features=False)
    with pytest.raises(DataError, match="NaN or infinite features .first at row 250"):
        knn.neighbours(FeatureRows(lazy), k=3)


def test_unwritable_cache_is_logged_not_fatal(tmp_path, caplog):
    x, labels = clustered(m=100, d=8)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="mcpipe.cleaner.knn"):
        g = knn.load_or_build(make_store(tmp_path, x, labels), labels, k=3, cache_dir=blocker / "sub")
    assert g.neighbours.shape == (100, 3) and "could not write the kNN cache" in caplog.text
