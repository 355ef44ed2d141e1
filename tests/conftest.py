"""Fixtures shared by several test files."""

from __future__ import annotations

import os

import pytest
import torch

from mcpipe.store.synthetic import write_synthetic_store


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # make test: the cores are shared among the workers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    """A small feature folder: train.h5 (600 x 24, 5 classes) and test.h5 (200)."""
    d = tmp_path_factory.mktemp("feats")
    write_synthetic_store(d / "train.h5", 600, 24, 5, seed=1, spread=1.0, split="train")
    write_synthetic_store(d / "test.h5", 200, 24, 5, seed=1, spread=1.0, split="test")
    return d
