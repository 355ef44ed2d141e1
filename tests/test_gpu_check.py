"""bench/gpu_check.sh, the one-script check of mcpipe's CUDA paths, run in its CPU mode so that it does not rot:
every step runs and prints its figures, and a bad argument or a failing step is one line naming it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow  # the whole script runs: a minute

NUMBER = r"([\d,]+(?:\.\d+)?)"
STEP_LINES = {  # step -> its line; every group is a figure that must be positive
    "extract": rf"^extract: {NUMBER} images, {NUMBER} img/s",
    "train-head": rf"^train-head: {NUMBER} x {NUMBER} features, {NUMBER} classes, one epoch {NUMBER} img/s",
    "finetune": rf"^finetune: mcpipe N = 4 {NUMBER} img/s, plain torchvision loop {NUMBER} img/s, a/b = {NUMBER}",
    "torchrun": rf"^torchrun: 1 process {NUMBER} img/s, one plain process {NUMBER} img/s, ratio {NUMBER}",
}


def gpu_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)


def test_cpu_mode_runs_every_step_and_prints_its_figures(tmp_path):
    res = gpu_check("--device", "cpu", "--python", sys.executable, "--dir", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    for step, pattern in STEP_LINES.items():
        m = re.search(pattern, res.stdout, re.M)
        assert m, f"no {step} line in:\n{res.stdout}"
        assert all(float(g.replace(",", "")) > 0 for g in m.groups()), m.group(0)
    assert "gloo all_reduce + DistributedDataParallel step ok" in res.stdout  # the backend, checked directly
    assert res.stdout.splitlines()[-1] == "gpu_check: all 4 steps passed on cpu"
    assert list(tmp_path.iterdir()) == []  # the work folder is removed


def test_a_bad_device_is_one_line_and_a_non_zero_exit(tmp_path):
    res = gpu_check("--device", "bogus", "--dir", str(tmp_path), cwd=tmp_path)
    assert res.returncode != 0
    assert res.stderr.splitlines() == ["gpu_check: --device must be cuda or cpu, not 'bogus'"]
    assert res.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_failing_step_is_named_and_its_log_kept(tmp_path):
    python = tmp_path / "python"  # the real interpreter, except that `-m mcpipe extract` fails
    python.write_text(f'#!/bin/sh\ncase " $* " in *" extract "*) echo "simulated failure" >&2; exit 3;; esac\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    res = gpu_check("--device", "cpu", "--python", str(python), "--dir", str(tmp_path / "work"), cwd=tmp_path)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "gpu_check: step 1 (extract) FAILED (exit 3) on cpu" in res.stderr
    assert "simulated failure" in res.stderr  # the tail of the step's log
    assert "passed" not in res.stdout
    (work,) = (tmp_path / "work").iterdir()  # kept for its logs
    assert (work / "extract.log").read_text() == "simulated failure\n"
