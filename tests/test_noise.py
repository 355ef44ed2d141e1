"""Synthetic label noise: exact realized rates, the flip rules, matrix sampling, determinism, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from mcpipe.cleaner.noise import apply_noise, noise_from_config
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
