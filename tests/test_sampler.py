"""K x N subset sampling: label purity, class balance, coverage, shuffling, determinism, mining modes, refusals."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mcpipe.cleaner.sampler import SubsetSampler
from mcpipe.errors import ConfigError


def uneven_labels(seed=0):
    """7 classes of 9..60 images, shuffled."""
    sizes = [9, 12, 17, 25, 33, 48, 60]
    labels = np.repeat(np.arange(7), sizes)
    return np.random.default_rng(seed).permutation(labels)


def all_subsets(sampler, epoch):
    return np.concatenate(list(sampler.epoch(epoch)))


def test_batches_have_k_subsets_of_n_and_cover_the_set_size():
    labels = uneven_labels()
    s = SubsetSampler(labels, subset_size=4, batch_size=42, seed=0)  # K = 10 (42 // 4)
    batches = list(s.epoch(0))
    assert len(s) == len(batches) == int(np.ceil(len(labels) / 40))
    assert all(b.shape == (10, 4) and b.dtype == np.int64 for b in batches)
    assert sum(b.size for b in batches) >= len(labels)


def test_every_subset_carries_one_label():
    labels = uneven_labels()
    for mining in ("random", "knn", "agreement"):
        s = SubsetSampler(labels, subset_size=4, batch_size=40, mining=mining, seed=1,
                          neighbours=np.full((len(labels), 3), -1), agreement=np.ones(len(labels)))
        rows = all_subsets(s, 2)
        assert (labels[rows] == labels[rows[:, :1]]).all(), mining


def test_classes_are_balanced_and_repeat_when_k_exceeds_c():
    labels = uneven_labels()
    s = SubsetSampler(labels, subset_size=2, batch_size=30, seed=0)  # K = 15 > 7 classes
    batches = list(s.epoch(0))
    per_class = np.bincount(labels[np.concatenate(batches)[:, 0]], minlength=7)
    assert per_class.max() - per_class.min() <= 1
    assert all(len(np.unique(labels[b[:, 0]])) == 7 for b in batches[:-1])  # each batch holds every class


def test_an_aligned_epoch_draws_every_image_exactly_once():
    labels = np.repeat(np.arange(5), 40)  # 5 classes x 40 images, N = 4, K = 5: 10 subsets per class
    s = SubsetSampler(labels, subset_size=4, batch_size=20, seed=3)
    for epoch in (0, 1):
        np.testing.assert_array_equal(np.bincount(all_subsets(s, epoch).ravel(), minlength=200), 1)


def test_images_of_a_class_are_drawn_about_equally_often():
    labels = uneven_labels()
    s = SubsetSampler(labels, subset_size=4, batch_size=40, seed=0)
    counts = np.bincount(all_subsets(s, 0).ravel(), minlength=len(labels))
    total = np.zeros(len(labels), dtype=np.int64)
    for epoch in range(6):
        total += np.bincount(all_subsets(s, epoch).ravel(), minlength=len(labels))
    for c in range(7):
        members = labels == c
        assert counts[members].max() - counts[members].min() <= 3
        # over epochs the class streams run on: the spread does not grow with the number of draws
        assert total[members].max() - total[members].min() <= 3
        assert total[members].min() > 0


def test_no_image_twice_in_a_subset_of_a_large_enough_class():
    labels = uneven_labels()
    rows = all_subsets(SubsetSampler(labels, subset_size=4, batch_size=40, seed=0), 0)
    assert (np.diff(np.sort(rows, axis=1), axis=1) > 0).all()


def test_order_inside_subsets_is_random_and_changes_between_epochs():
    labels = np.repeat(np.arange(4), 100)
    s = SubsetSampler(labels, subset_size=4, batch_size=16, seed=0)
    a, b = all_subsets(s, 0), all_subsets(s, 1)
    assert np.mean((np.diff(a, axis=1) > 0).all(axis=1)) < 0.2  # sorted rows: 1 / 4! if shuffled
    first = {tuple(sorted(r)) for r in a}
    assert sum(tuple(sorted(r)) in first for r in b) < len(b) / 2
    assert not np.array_equal(np.sort(a, axis=1), np.sort(b, axis=1))


def test_an_epoch_depends_only_on_seed_and_epoch():
    labels = uneven_labels()
    for mining in ("random", "knn", "agreement"):
        kw = dict(subset_size=3, batch_size=30, mining=mining, neighbours=np.full((len(labels), 2), -1),
                  agreement=np.linspace(0, 1, len(labels)))
        first = SubsetSampler(labels, seed=5, **kw)
        later = all_subsets(first, 4)
        for e in range(4):
            all_subsets(first, e)
        np.testing.assert_array_equal(all_subsets(first, 4), later)
        np.testing.assert_array_equal(all_subsets(SubsetSampler(labels, seed=5, **kw), 4), later)  # resumed run
        assert not np.array_equal(all_subsets(SubsetSampler(labels, seed=6, **kw), 4), later)


def test_small_classes_are_drawn_with_replacement():
    labels = np.concatenate([np.zeros(2, dtype=np.int64), np.ones(30, dtype=np.int64), np.full(3, 2)])
    s = SubsetSampler(labels, subset_size=4, batch_size=12, seed=0)
    assert s.small_classes == [0, 2]
    rows = all_subsets(s, 0)
    for row in rows[labels[rows[:, 0]] == 0]:
        assert sorted(np.bincount(row, minlength=2)[:2]) == [2, 2]  # both images, twice each
    for row in rows[labels[rows[:, 0]] == 2]:
        assert set(row) == {32, 33, 34}  # all three images, one of them twice


def test_subset_larger_than_every_class_is_refused():
    labels = np.repeat(np.arange(3), [2, 5, 3])
    with pytest.raises(ConfigError, match="subset_size = 6 is larger than every class: the largest class has 5"):
        SubsetSampler(labels, subset_size=6, batch_size=12)


@pytest.mark.parametrize("kwargs,match", [
    ({"subset_size": 0, "batch_size": 8}, "subset_size = 0"),
    ({"subset_size": 4, "batch_size": 3}, "batch_size = 3"),
    ({"subset_size": 2, "batch_size": 8, "mining": "hard"}, "mining = 'hard'"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SubsetSampler(uneven_labels(), **kwargs)


def test_mining_arrays_are_checked():
    labels = uneven_labels()
    with pytest.raises(ValueError, match="needs neighbours"):
        SubsetSampler(labels, subset_size=2, batch_size=8, mining="knn")
    with pytest.raises(ValueError, match="indices in"):
        SubsetSampler(labels, subset_size=2, batch_size=8, mining="knn", neighbours=np.full((len(labels), 2), 10**6))
    with pytest.raises(ValueError, match="needs agreement"):
        SubsetSampler(labels, subset_size=2, batch_size=8, mining="agreement")
    with pytest.raises(ValueError, match="agreement must be"):
        SubsetSampler(labels, subset_size=2, batch_size=8, mining="agreement", agreement=-np.ones(len(labels)))


def test_knn_subsets_are_an_anchor_and_its_nearest_same_label_neighbours():
    labels = uneven_labels()
    rng = np.random.default_rng(0)
    m = len(labels)
    members = {c: np.flatnonzero(labels == c) for c in range(7)}
    # 5 neighbours per row: a foreign-label one and -1 mixed in, which must be skipped
    neighbours = np.full((m, 5), -1, dtype=np.int64)
    for i in range(m):
        same = rng.choice(members[labels[i]][members[labels[i]] != i], size=3, replace=False)
        other = rng.choice(np.flatnonzero(labels != labels[i]))
        neighbours[i] = [other, same[0], -1, same[1], same[2]]
    s = SubsetSampler(labels, subset_size=3, batch_size=30, mining="knn", neighbours=neighbours, seed=0)
    rows = all_subsets(s, 0)
    expected = [{a, *[n for n in neighbours[a] if n >= 0 and labels[n] == labels[a]][:2]} for a in range(m)]
    assert all(any(set(r) == expected[a] for a in r) for r in rows)
    # anchors come from the class streams: 10 subsets of the 9-image class anchor each of its images
    assert set(members[0]) <= set(rows.ravel())


def test_knn_falls_back_to_random_same_class_images():
    labels = uneven_labels()
    none = np.full((len(labels), 4), -1, dtype=np.int64)
    rows = all_subsets(SubsetSampler(labels, subset_size=4, batch_size=40, mining="knn", neighbours=none), 0)
    assert (labels[rows] == labels[rows[:, :1]]).all()
    assert (np.diff(np.sort(rows, axis=1), axis=1) > 0).all()  # still four different images


def test_agreement_mining_prefers_high_agreement_images():
    labels = np.repeat(np.arange(3), 40)
    score = np.tile(np.repeat([1.0, 0.0], 20), 3)  # per class: 20 agreeing images, 20 disagreeing
    s = SubsetSampler(labels, subset_size=4, batch_size=24, mining="agreement", agreement=score, seed=0)
    counts = np.zeros(len(labels))
    for epoch in range(5):
        rows = all_subsets(s, epoch)
        assert (np.diff(np.sort(rows, axis=1), axis=1) > 0).all()
        counts += np.bincount(rows.ravel(), minlength=len(labels))
    assert counts[score == 1].mean() > 3 * counts[score == 0].mean()
    assert counts[score == 0].sum() > 0  # down-weighted, never excluded


def test_an_epoch_of_food101n_size_is_fast():
    labels = np.random.default_rng(0).integers(0, 101, 310_000)
    s = SubsetSampler(labels, subset_size=4, batch_size=480, seed=0)
    start = time.perf_counter()
    batches = list(s.epoch(7))
    elapsed = time.perf_counter() - start
    assert len(batches) == 646 and batches[0].shape == (120, 4)
    assert elapsed < 1.0, f"an epoch took {elapsed:.2f} s"
