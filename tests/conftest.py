"""Fixtures and helpers shared by the test files (``from conftest import TINY, invoke, sets``).

``TINY``: the smallest real extraction (ResNet-18, random init, 32 px, CPU); ``sets``: ``--set`` arguments;
``invoke``: a command through typer's test runner (no traceback may reach the output); ``mcpipe``: the same
command as a subprocess argv, for tests that signal or kill it.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mcpipe.cli import app
from mcpipe.store.synthetic import write_synthetic_store

TINY = ("extract.backbone=resnet18", "extract.weights=none", "extract.image_size=32", "extract.batch_size=4",
        "extract.device=cpu", "extract.num_workers=0")


def sets(*items: str) -> list[str]:
    """``--set`` arguments, one per ``section.key=value``."""
    return [a for item in items for a in ("--set", str(item))]


def invoke(*args):
    """``mcpipe ARGS`` in this process (typer's runner); a traceback in its output fails the test."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def sweep_runs(sweep: Path) -> dict[tuple, Path]:
    """A finished sweep's run folders by point, as its results.csv lists them: {(value, ...): folder}, the
    values in the grid's key order, as written (e.g. ("0.4", "2") for noise.rate and cleaner.subset_size)."""
    rows = list(csv.DictReader((Path(sweep) / "results.csv").read_text(encoding="utf-8").splitlines()))
    keys = [k for k in rows[0] if "." in k]  # the grid's section.key columns
    return {tuple(r[k] for k in keys): Path(sweep) / r["run"] for r in rows}


def mcpipe(*args: str) -> list[str]:
    """The argv of ``python -m mcpipe ARGS``, for a subprocess."""
    return [sys.executable, "-m", "mcpipe", *map(str, args)]

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # make test: the cores are shared among the workers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    """A small feature folder: train.h5 (600 x 24, 5 classes) and test.h5 (200)."""
    d = tmp_path_factory.mktemp("feats")
    write_synthetic_store(d / "train.h5", 600, 24, 5, seed=1, spread=1.0, split="train")
    write_synthetic_store(d / "test.h5", 200, 24, 5, seed=1, spread=1.0, split="test")
    return d
