"""train-head and sweep under SIGTERM and kill -9: they stop resumably (exit 75, one line), --resume auto
(or the same sweep command) continues, and the result equals an uninterrupted run's."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sweep_runs
from mcpipe.stopping import EXIT_PREEMPTED
from mcpipe.store.synthetic import write_synthetic_store

MCPIPE = [sys.executable, "-m", "mcpipe"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FIXED = ["--set", "train.auto=false", "--set", "train.epochs=12", "--set", "cleaner.subset_size=2",
         "--no-progress", "--log-level", "warning"]
SEED = 1402  # the kill times below come from this seed: a failure names it and replays


def start(*args, pause_at: str = "", pause: float = 0.0) -> subprocess.Popen:
    """The command, started; with ``pause_at`` it sleeps ``pause`` s at that point (mcpipe.faults)."""
    env = {**ENV, "MCPIPE_TEST_PAUSE_AT": pause_at, "MCPIPE_TEST_PAUSE_SECONDS": str(pause)} if pause_at else ENV
    return subprocess.Popen([*MCPIPE, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_pause(proc: subprocess.Popen, point: str) -> None:
    """Read the process's stderr up to its ``test pause at <point>`` line."""
    for line in proc.stderr:
        if f"test pause at {point}" in line:
            return
    raise AssertionError(f"the run ended before {point}: {proc.communicate()}")


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*MCPIPE, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=600)


def wait_for(folder: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until a file matching ``pattern`` is in ``folder`` (the run must not end first)."""
    end = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"no {folder / pattern} appeared"
        time.sleep(0.02)


def same_run(a: Path, b: Path) -> None:
    """Two head runs hold the same model, scores and metrics (timings aside)."""
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    timeless = lambda m: json.loads(json.dumps(m), object_hook=lambda d: {  # noqa: E731
        k: v for k, v in d.items() if k not in ("seconds", "images_per_second", "features")})
    assert timeless(ma) == timeless(mb)
    ha, hb = (torch.load(r / "head.pt", weights_only=True)["state_dict"] for r in (a, b))
    assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)
    assert (a / "scores.csv").read_bytes() == (b / "scores.csv").read_bytes()


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """Features large enough that an epoch lasts long enough for two signals to land in it."""
    d = tmp_path_factory.mktemp("big")
    write_synthetic_store(d / "train.h5", 20000, 64, 10, seed=3, spread=1.0, split="train")
    write_synthetic_store(d / "test.h5", 500, 64, 10, seed=3, spread=1.0, split="test")
    return d


@pytest.mark.slow
def test_sigterm_stops_after_the_epoch_and_resume_auto_finishes_the_same_run(feats, tmp_path):
    ref = run("train-head", "--features", feats, "--out", tmp_path / "ref", *FIXED)
    assert ref.returncode == 0, ref.stderr
    for sig in (signal.SIGTERM,):  # (SIGUSR1, the same handler: tests/test_preemption_finetune.py, _extract.py)
        out = tmp_path / sig.name
        proc = start("train-head", "--features", feats, "--out", out, *FIXED)
        wait_for(out, "checkpoint.pt", proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_PREEMPTED, err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"stopped on {sig.name}: checkpoint after epoch ") and "of 12 in" in line, err
        assert "--resume auto" in line and "Traceback" not in err
        done = run("train-head", "--features", feats, "--out", out, "--resume", "auto", *FIXED)
        assert done.returncode == 0, done.stderr
        same_run(out, tmp_path / "ref")
    # during the final export (last epoch saved, scores.csv written, head.pt not yet): kill -9 loses only the
    # export, redone on resume; a SIGTERM lets the export finish (seconds) and the run ends as usual
    for sig in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / f"export-{sig.name}"
        proc = start("train-head", "--features", feats, "--out", out, *FIXED, pause_at="head_export", pause=1.5)
        wait_for_pause(proc, "head_export")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if sig == signal.SIGKILL:
            assert not (out / "head.pt").exists()
            done = run("train-head", "--features", feats, "--out", out, "--resume", "auto", *FIXED)
            assert done.returncode == 0, done.stderr
        else:
            assert proc.returncode == 0 and "Traceback" not in err, err
        same_run(out, tmp_path / "ref")


@pytest.mark.slow
def test_sigterm_during_the_search_redoes_it_and_kill_9_anywhere_resumes(feats, tmp_path):
    auto = ["--no-progress", "--log-level", "warning"]
    assert run("train-head", "--features", feats, "--out", tmp_path / "ref", *auto).returncode == 0
    out = tmp_path / "search"
    proc = start("train-head", "--features", feats, "--out", out, *auto)
    wait_for(out, "checkpoint.pt", proc)  # written before the search starts
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED and "the search on validation is redone on resume" in err, err
    assert run("train-head", "--features", feats, "--out", out, "--resume", "auto", *auto).returncode == 0
    same_run(out, tmp_path / "ref")

    rng = np.random.default_rng(SEED)
    for trial, delay in enumerate(rng.uniform(0.5, 6.0, size=1)):
        out = tmp_path / f"kill{trial}"
        proc = start("train-head", "--features", feats, "--out", out, *auto)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        done = run("train-head", "--features", feats, "--out", out, "--resume", "auto", *auto)
        assert done.returncode == 0, (SEED, trial, delay, done.stderr)
        same_run(out, tmp_path / "ref")


@pytest.mark.slow
def test_a_second_signal_stops_at_once(big, tmp_path):
    out = tmp_path / "run"
    proc = start("train-head", "--features", big, "--out", out, *FIXED, "--set", "train.batch_size=64")
    wait_for(out, "config.toml", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # a repeat within a second counts as the same request
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, EXIT_PREEMPTED), err  # 75 only if the epoch ended between the two
    if proc.returncode == 130:
        assert "interrupted" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_signal_while_a_stopped_run_exits_does_not_turn_its_exit_code_into_a_kill(big, tmp_path):
    """The stop's line is printed, the checkpoint written; the process is exiting (torch's teardown can take
    seconds) when the scheduler repeats its SIGTERM: still exit 75, not killed by the signal."""
    out = tmp_path / "run"
    proc = start("train-head", "--features", big, "--out", out, *FIXED, "--set", "train.batch_size=64")
    wait_for(out, "config.toml", proc)
    proc.send_signal(signal.SIGTERM)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "stopped on SIGTERM" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, "".join(seen) + err


@pytest.mark.slow
def test_sweep_stops_resumably_and_continues_to_the_same_results(feats, tmp_path):
    grid = ["--set", "sweep.cleaner.subset_size=[2, 1]"]
    assert run("sweep", "--features", feats, "--out", tmp_path / "ref", *FIXED, *grid).returncode == 0
    out = tmp_path / "sweep"
    proc = start("sweep", "--features", feats, "--out", out, *FIXED, *grid)
    wait_for(out, "*/checkpoint.pt", proc)  # the first point's
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED and "run the same sweep command again" in err, err
    assert not (out / "results.csv").exists()
    done = run("sweep", "--features", feats, "--out", out, *FIXED, *grid)
    assert done.returncode == 0, done.stderr
    rows = lambda d: [{k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                      for r in csv.DictReader((d / "results.csv").read_text().splitlines())]
    assert rows(out) == rows(tmp_path / "ref")
    ref = sweep_runs(tmp_path / "ref")
    assert set(ref) == {("2",), ("1",)}
    for point, run_dir in sweep_runs(out).items():
        same_run(run_dir, ref[point])
    # kill -9 during the sweep's final export (results.csv written, results.md not yet): the same command
    # writes both again from the finished points
    (out / "results.md").unlink()
    proc = start("sweep", "--features", feats, "--out", out, *FIXED, *grid, pause_at="sweep_results", pause=30)
    wait_for_pause(proc, "sweep_results")
    proc.kill()
    proc.communicate()
    assert rows(out) == rows(tmp_path / "ref") and not (out / "results.md").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no temporary left visible as a result
    done = run("sweep", "--features", feats, "--out", out, *FIXED, *grid)
    assert done.returncode == 0, done.stderr
    assert rows(out) == rows(tmp_path / "ref") and (out / "results.md").read_text().startswith("| chosen")
