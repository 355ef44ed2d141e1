"""Synthetic label noise: exact realized rates, the flip rules, matrix sampling, instance-dependent flips, determinism,
refusals."""

from __future__ import annotations

import numpy as np
import pytest

from mcpipe.cleaner.noise import apply_noise, instance_margins, noise_from_config
from mcpipe.config import NoiseConfig
from mcpipe.errors import ConfigError


def make_labels(m=5000, c=10, seed=0):
    return np.random.default_rng(seed).integers(0, c, m)


def test_none_is_an_untouched_copy():
    y = make_labels()
    out = apply_noise(y, 10, kind="none")
    np.testing.assert_array_equal(out, y)
    assert out is not y and out.dtype == np.int64


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.9])
def test_symmetric_flips_exactly_round_rate_m_to_other_classes(rate):
    y = make_labels(m=5001)
    before = y.copy()
    out = apply_noise(y, 10, kind="symmetric", rate=rate, seed=3)
    np.testing.assert_array_equal(y, before)  # input untouched
    assert (out != y).sum() == round(rate * len(y))
    assert out.min() >= 0 and out.max() < 10


def test_symmetric_new_labels_are_uniform_over_the_other_classes():
    y = np.zeros(30000, dtype=np.int64)
    out = apply_noise(y, 4, kind="symmetric", rate=0.6, seed=0)
    counts = np.bincount(out[out != 0], minlength=4)[1:]
    assert counts.sum() == 18000
    np.testing.assert_allclose(counts / counts.sum(), 1 / 3, atol=0.02)


def test_pairflip_moves_class_c_to_c_plus_one():
    y = make_labels(c=5)
    out = apply_noise(y, 5, kind="pairflip", rate=0.3, seed=1)
    flipped = out != y
    assert flipped.sum() == round(0.3 * len(y))
    np.testing.assert_array_equal(out[flipped], (y[flipped] + 1) % 5)


def test_matrix_frequencies_follow_the_rows():
    rng = np.random.default_rng(0)
    t = rng.random((4, 4))
    t[0, 3] = 0.0  # a zero-probability entry is never drawn
    t /= t.sum(axis=1, keepdims=True)
    y = np.repeat(np.arange(4), 20000)
    out = apply_noise(y, 4, kind="matrix", matrix=t.tolist(), seed=5)
    for c in range(4):
        freq = np.bincount(out[y == c], minlength=4) / 20000
        np.testing.assert_allclose(freq, t[c], atol=0.015)
    assert not ((y == 0) & (out == 3)).any()


def test_identity_matrix_changes_nothing():
    y = make_labels(c=3)
    np.testing.assert_array_equal(apply_noise(y, 3, kind="matrix", matrix=np.eye(3)), y)


@pytest.mark.parametrize("kind,extra", [("symmetric", {"rate": 0.3}), ("pairflip", {"rate": 0.3}),
                                        ("matrix", {"matrix": np.full((10, 10), 0.1)})])
def test_seeded_and_deterministic(kind, extra):
    y = make_labels()
    a = apply_noise(y, 10, kind=kind, seed=7, **extra)
    np.testing.assert_array_equal(a, apply_noise(y, 10, kind=kind, seed=7, **extra))
    assert not np.array_equal(a, apply_noise(y, 10, kind=kind, seed=8, **extra))


def test_noise_from_config():
    y = make_labels()
    cfg = NoiseConfig(kind="symmetric", rate=0.25, seed=4)
    np.testing.assert_array_equal(noise_from_config(y, 10, cfg),
                                  apply_noise(y, 10, kind="symmetric", rate=0.25, seed=4))
    t = tuple(tuple(0.5 if j in (i, (i + 1) % 3) else 0.0 for j in range(3)) for i in range(3))
    out = noise_from_config(make_labels(c=3), 3, NoiseConfig(kind="matrix", matrix=t))
    assert out.shape == (5000,)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "symmetric", "rate": 1.0}, "noise.rate = 1.0"),
    ({"kind": "pairflip", "rate": -0.1}, "noise.rate = -0.1"),
    ({"kind": "uniform", "rate": 0.1}, "noise.kind = 'uniform'"),
    ({"kind": "matrix"}, "noise.matrix is missing"),
    ({"kind": "matrix", "matrix": np.eye(3)}, r"shape \(3, 3\); expected \(4, 4\)"),
    ({"kind": "matrix", "matrix": [[1, 0, 0, 0]] * 3 + [[1, 0]]}, "unequal length"),
    ({"kind": "matrix", "matrix": np.eye(4) * 2 - 0.25}, r"noise.matrix\[0\]\[1\] = -0.25 is negative"),
    ({"kind": "matrix", "matrix": np.full((4, 4), 0.3)}, "row 0 sums to 1.2"),
    ({"kind": "matrix", "matrix": np.full((4, 4), np.nan)}, "NaN"),
])
def test_refusals_name_the_problem(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        apply_noise(make_labels(c=4), 4, **kwargs)


def test_flipping_needs_two_classes():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        apply_noise(np.zeros(10, dtype=np.int64), 1, kind="symmetric", rate=0.2)


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 10\], outside the 10 classes"):
        apply_noise(np.arange(11), 10, kind="symmetric", rate=0.1)


# --- kind = instance -------------------------------------------------------------------------------------------

def make_planted(per_class=200, c=4, d=16, ambiguous=0.1, seed=0):
    """(M, D) float32 clusters, M = c * per_class; an ``ambiguous`` fraction sits between its class and the next.

    Returns features, labels, the (M,) bool mask of planted ambiguous images and each image's next class.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 3
    y = np.repeat(np.arange(c), per_class)
    partner = (y + 1) % c
    planted = rng.random(len(y)) < ambiguous
    w = np.where(planted, 0.55, 1.0)[:, None]
    x = w * centers[y] + (1 - w) * centers[partner] + rng.normal(size=(len(y), d)) + 5.0  # all-positive-ish, as ReLU
    return x.astype(np.float32), y, planted, partner


def reference_margins(x, y, c):
    """Nearest other class and margin, computed the plain float64 way on the whole array."""
    z = x.astype(np.float64)
    z = (z - z.mean(0)) / np.maximum(z.std(0), 1e-6)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    mu = np.stack([z[y == k].mean(0) for k in range(c)])
    cos = z @ (mu / np.linalg.norm(mu, axis=1, keepdims=True)).T
    rows = np.arange(len(y))
    own = cos[rows, y].copy()
    cos[rows, y] = -np.inf
    return cos.argmax(1), cos.max(1) - own


@pytest.mark.parametrize("block", [7, 4096])
def test_instance_margins_match_the_plain_computation(block):
    x, y, _, _ = make_planted()
    nearest, margin = instance_margins(x, y, 4, block=block)
    ref_nearest, ref_margin = reference_margins(x, y, 4)
    np.testing.assert_array_equal(nearest, ref_nearest)
    np.testing.assert_allclose(margin, ref_margin, atol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.45, 0.9])
def test_instance_flips_exactly_round_rate_m_to_the_nearest_other_class(rate):
    x, y, _, _ = make_planted(per_class=251)
    before_x, before_y = x.copy(), y.copy()
    out = apply_noise(y, 4, kind="instance", rate=rate, seed=2, features=x)
    np.testing.assert_array_equal(y, before_y)  # inputs untouched
    np.testing.assert_array_equal(x, before_x)
    flipped = out != y
    assert flipped.sum() == round(rate * len(y)) and out.dtype == np.int64
    np.testing.assert_array_equal(out[flipped], reference_margins(x, y, 4)[0][flipped])


def test_instance_flips_concentrate_on_ambiguous_images_but_are_drawn():
    x, y, planted, partner = make_planted(ambiguous=0.1)
    margin = reference_margins(x, y, 4)[1]
    assert margin[planted].mean() > margin[~planted].mean() + 0.5  # the planted images are the ambiguous ones
    rate = 0.05
    out = apply_noise(y, 4, kind="instance", rate=rate, seed=0, features=x)
    flipped = out != y
    assert margin[flipped].mean() > margin[~flipped].mean() + 0.5
    assert planted[flipped].mean() > 0.8  # vs 0.1 for symmetric noise
    assert (out[flipped & planted] == partner[flipped & planted]).mean() > 0.9  # mostly to the class it sits by
    top = np.argsort(-margin)[:flipped.sum()]
    assert not flipped[top].all()  # not simply the highest margins


def test_instance_is_seeded_and_deterministic():
    x, y, _, _ = make_planted()
    a = apply_noise(y, 4, kind="instance", rate=0.2, seed=7, features=x)
    np.testing.assert_array_equal(a, apply_noise(y, 4, kind="instance", rate=0.2, seed=7, features=x))
    assert not np.array_equal(a, apply_noise(y, 4, kind="instance", rate=0.2, seed=8, features=x))


def test_instance_reads_float16_as_float32():
    x, y, _, _ = make_planted()
    x16 = x.astype(np.float16)
    out = apply_noise(y, 4, kind="instance", rate=0.2, seed=1, features=x16)
    assert x16.dtype == np.float16
    np.testing.assert_array_equal(out, apply_noise(y, 4, kind="instance", rate=0.2, seed=1,
                                                   features=x16.astype(np.float32)))
    assert (out != y).sum() == round(0.2 * len(y))


def test_instance_from_config_passes_the_features():
    x, y, _, _ = make_planted()
    out = noise_from_config(y, 4, NoiseConfig(kind="instance", rate=0.3, seed=5), features=x)
    np.testing.assert_array_equal(out, apply_noise(y, 4, kind="instance", rate=0.3, seed=5, features=x))
    with pytest.raises(ConfigError, match=r"noise.kind = instance needs the training features.*train-head"):
        noise_from_config(y, 4, NoiseConfig(kind="instance", rate=0.3))


def test_features_are_ignored_by_the_other_kinds():
    x, y, _, _ = make_planted()
    np.testing.assert_array_equal(apply_noise(y, 4, kind="symmetric", rate=0.3, seed=3, features=x),
                                  apply_noise(y, 4, kind="symmetric", rate=0.3, seed=3))


@pytest.mark.parametrize("features,error,match", [
    (None, ConfigError, "noise.kind = instance needs the training features"),
    (np.zeros((799, 16), dtype=np.float32), ValueError, r"shape \(799, 16\); expected \(M, D\) = \(800, D >= 1\)"),
    (np.zeros(800, dtype=np.float32), ValueError, r"shape \(800,\)"),
    (np.zeros((800, 16), dtype=np.int64), ValueError, "dtype int64"),
    (np.full((800, 16), np.nan, dtype=np.float32), ValueError, "NaN or infinite"),
])
def test_instance_refusals_name_the_problem(features, error, match):
    y = np.repeat(np.arange(4), 200)
    with pytest.raises(error, match=match):
        apply_noise(y, 4, kind="instance", rate=0.2, features=features)


def test_instance_needs_two_classes_with_images():
    x, _, _, _ = make_planted()
    with pytest.raises(ConfigError, match="at least 2 classes, got only class 2"):
        apply_noise(np.full(len(x), 2), 4, kind="instance", rate=0.2, features=x)
