"""mcpipe extract end to end: CLI, every source, bad images, Ctrl-C + resume, torchrun with gloo (kill -9 and
resume: tests/test_interrupt.py, tests/test_preemption_extract.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, invoke, sets
from fixtures_data import make_cifar10, make_clothing1m, make_food101n, make_idx, make_imagefolder, make_manifest
from mcpipe.store.reader import open_store

def tiny(*items: str) -> list[str]:
    return sets(*TINY, *items)


def varied_imagefolder(root: Path, n: int, *, classes: int = 3, size: int = 24) -> Path:
    rng = np.random.default_rng(1)
    from PIL import Image

    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def test_extract_and_inspect_through_cli(tmp_path):
    root = make_imagefolder(tmp_path / "data", classes=("cat", "dog", "owl"), per_class=3, splits=("train", "test"))
    out = tmp_path / "feats"
    res = invoke("extract", "--out", str(out), *tiny("data.source=imagefolder", f"data.root={root}"))
    assert res.exit_code == 0, res.output
    assert "train: 9 rows" in res.output and "test: 9 rows" in res.output and "0 skipped" in res.output
    store = open_store(out / "train.h5")
    assert store.features.shape == (9, 512) and store.features.dtype == np.float16
    assert store.classes == ["cat", "dog", "owl"]
    assert store.attrs["backbone"] == "resnet18" and store.attrs["random_init"] is True
    assert store.attrs["weights"] == "none" and store.attrs["image_size"] == 32
    assert (out / "config.toml").read_text().count("[extract]") == 1
    # a second identical command finds the work done
    again = invoke("extract", "--out", str(out), *tiny("data.source=imagefolder", f"data.root={root}"))
    assert again.exit_code == 0 and "complete already" in again.output
    shown = invoke("inspect", str(out / "test.h5"))
    assert shown.exit_code == 0, shown.output
    assert "9 rows" in shown.output.replace(",", "") or "rows        9" in shown.output
    assert "512-d float16" in shown.output and "RANDOM INIT" in shown.output and "100.0% of rows" in shown.output


@pytest.mark.parametrize("source", ["imagefolder", "manifest", "food101n", "clothing1m", "fashion-mnist", "mnist",
                                    "cifar10"])
def test_every_source_extracts(tmp_path, source):
    makers = {
        "imagefolder": lambda p: make_imagefolder(p),
        "manifest": lambda p: make_manifest(p),
        "food101n": lambda p: make_food101n(p),
        "clothing1m": lambda p: make_clothing1m(p),
        "fashion-mnist": lambda p: make_idx(p),
        "mnist": lambda p: make_idx(p),
        "cifar10": lambda p: make_cifar10(p),
    }
    root = makers[source](tmp_path / "data")
    from mcpipe.config import load_config
    from mcpipe.extract.run import run
    from mcpipe.extract.sources.registry import available_splits, load_index

    cfg = load_config(None, [*TINY, f"data.source={source}", f"data.root={root}"])
    results = run(cfg, out=tmp_path / "out", progress=False)
    assert [r.split for r in results] == available_splits(cfg.data)
    for r in results:
        index = load_index(cfg.data, r.split)
        store = open_store(r.path)
        assert r.complete and store.ids == index.ids
        np.testing.assert_array_equal(store.labels, index.labels)
        np.testing.assert_array_equal(store.clean_labels, index.clean_labels)
        assert store.attrs["dataset"] == source and store.classes == index.classes


def test_limit_takes_a_seeded_subset(tmp_path):
    root = make_idx(tmp_path / "data", n_train=30, n_test=5)
    args = tiny("data.source=mnist", f"data.root={root}", 'data.splits=["train"]', "data.limit=7", "data.seed=3")
    assert invoke("extract", "--out", str(tmp_path / "a"), *args).exit_code == 0
    assert invoke("extract", "--out", str(tmp_path / "b"), *args).exit_code == 0
    a, b = open_store(tmp_path / "a" / "train.h5"), open_store(tmp_path / "b" / "train.h5")
    assert len(a.ids) == 7 and a.ids == b.ids and a.ids == sorted(a.ids)
    np.testing.assert_array_equal(a.features, b.features)  # same images, same features


def test_bad_images_are_skipped_and_recorded(tmp_path):
    root = varied_imagefolder(tmp_path / "data", 9)
    (root / "c0" / "empty.png").write_bytes(b"")
    (root / "c1" / "noise.jpg").write_bytes(os.urandom(300))
    good = (root / "c2" / "0002.png").read_bytes()
    (root / "c2" / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "feats"
    res = invoke("extract", "--out", str(out), *tiny("data.source=imagefolder", f"data.root={root}"))
    assert res.exit_code == 0, res.output
    assert "3 skipped (1 corrupt, 1 empty, 1 truncated)" in res.output
    store = open_store(out / "train.h5")
    assert store.num_rows == 12 and len(store.ids) == 9
    assert sorted(store.skipped) == [("c0/empty.png", "empty"), ("c1/noise.jpg", "corrupt"),
                                     ("c2/truncated.png", "truncated")]
    shown = invoke("inspect", str(out / "train.h5"))
    assert "c1/noise.jpg" in shown.output and "3 skipped" in shown.output
    # --strict stops at the first bad image with one line naming it
    res = invoke("extract", "--out", str(tmp_path / "strict"), "--strict",
                 *tiny("data.source=imagefolder", f"data.root={root}"))
    assert res.exit_code == 1
    assert "c0/empty.png" in res.output and "empty" in res.output and "Traceback" not in res.output


def test_refusals_are_one_line(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    out = tmp_path / "feats"
    res = invoke("extract", "--out", str(out), *tiny("data.source=imagefolder", f"data.root={tmp_path / 'nope'}"))
    assert res.exit_code == 1 and "nope" in res.output and "Traceback" not in res.output
    res = invoke("extract", "--out", str(out), "--set", "extract.bogus=1")
    assert res.exit_code == 2 and "unknown key extract.bogus" in res.output
    assert invoke("extract", "--out", str(out), *tiny("data.source=imagefolder", f"data.root={root}")).exit_code == 0
    before = (out / "train.h5").read_bytes()
    # same output, other config: refused, store untouched
    res = invoke("extract", "--out", str(out), *tiny("data.source=imagefolder", f"data.root={root}",
                                                     "store.dtype=float32"))
    assert res.exit_code == 1 and "--overwrite" in res.output and "Traceback" not in res.output
    assert (out / "train.h5").read_bytes() == before
    res = invoke("extract", "--out", str(out), "--overwrite",
                 *tiny("data.source=imagefolder", f"data.root={root}", "store.dtype=float32"))
    assert res.exit_code == 0 and open_store(out / "train.h5").dtype == "float32"
    res = invoke("inspect", str(tmp_path / "data"))
    assert res.exit_code == 1 and "is a folder" in res.output


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcpipe", *args]


def _interrupt(cmd: list[str], sig: int, *, after_commits: int, env: dict) -> subprocess.Popen:
    """Run ``cmd`` and send ``sig`` once its log says ``after_commits`` blocks were committed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    commits = 0
    for line in proc.stderr:
        commits += "committed blocks" in line
        if commits == after_commits:
            os.kill(proc.pid, sig)
            break
    proc.stderr_rest = proc.stderr.read()
    proc.wait()
    return proc


def _extracted(stdout: str) -> int:
    return int(stdout.split(" extracted")[0].rsplit(";", 1)[1].replace(",", ""))


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path):
    root = varied_imagefolder(tmp_path / "data", 60, size=40)
    args = ["extract", "--no-progress", "--log-level", "debug", "--out", str(tmp_path / "out"),
            *tiny("data.source=imagefolder", f"data.root={root}", "extract.batch_size=2", "store.sync_seconds=0")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = _interrupt(_cli(*args), signal.SIGINT, after_commits=3, env=env)
    assert proc.returncode == 130, proc.stderr_rest
    assert "interrupted" in proc.stderr_rest and "Traceback" not in proc.stderr_rest
    partial = open_store(tmp_path / "out" / "train.h5", allow_incomplete=True)
    assert not partial.complete and len(partial.ids) >= 6
    res = subprocess.run(_cli(*args), env=env, capture_output=True, text=True)
    assert res.returncode == 0 and _extracted(res.stdout) == 60 - len(partial.ids)
    assert open_store(tmp_path / "out" / "train.h5").complete


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_join_into_one_store(tmp_path):
    root = varied_imagefolder(tmp_path / "data", 21)
    args = ["extract", "--no-progress", *tiny("data.source=imagefolder", f"data.root={root}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run(_cli(*args, "--out", str(single)), check=True, env=env, capture_output=True)
    multi = tmp_path / "multi"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mcpipe", *args, "--out", str(multi)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = open_store(single / "train.h5"), open_store(multi / "train.h5")
    assert a.ids == b.ids and b.complete
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert not list((multi / ".shards").glob("*.h5"))  # shards removed after the join
