"""mcpipe finetune preempted, interrupted, starved of disk and restarted: it stops resumably and resumes inside an
epoch to exactly the uninterrupted run.

* One output, one command (``--resume auto``, as a requeued job runs it; one DataLoader worker, in the process
  group that gets the signals) started three times: a SIGTERM while
  step k pauses finishes that step, writes its checkpoint and stops (exit 75, one line naming ``--resume``);
  then SIGUSR1 while a later step pauses and SIGTERM 1.5 s after it stops at once (exit 130), the checkpoint of
  step k still standing and loadable; then the run finishes, and its metrics (timings aside), model.pt tensors
  and confusion.csv equal an uninterrupted run's (no worker), itself started with ``--resume auto`` on an empty
  ``--out`` (it starts fresh). The steps come from ``random.Random(SEED)``; a failure names the seed and
  ``MCPIPE_FAULT_SEED=<seed>`` replays it. A step is reached through the test hook
  ``MCPIPE_TEST_PAUSE_AT=finetune_step`` (``mcpipe.faults``: a step's update is done, its checks not yet).
* Under torchrun (2 CPU ranks, gloo) a SIGTERM stops both ranks at the same step (one line each) and
  ``--resume auto`` finishes to the uninterrupted 2-rank run.
* A truncated checkpoint and a version-1 checkpoint are refused with one line; a full disk while a checkpoint
  is written is one line too, and the previous checkpoint stays loadable, no temporary left behind.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fixtures_data import make_noisy_colour_images
from mcpipe.cli import app
from mcpipe.finetune import checkpoint
from mcpipe.finetune.export import load_model
from mcpipe.locks import acquire
from mcpipe.stopping import EXIT_PREEMPTED, SAME_SIGNAL_SECONDS
from test_preemption_extract import Proc, assert_clean

SEED = int(os.environ.get("MCPIPE_FAULT_SEED", "14"))
REPLAY = f"seed {SEED} (MCPIPE_FAULT_SEED={SEED} replays it)"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 300
STEPS = 6  # batches an epoch: 24 training images, batches of 4
KEYS = ("extract.backbone=resnet18", "extract.weights=none", "extract.image_size=32", "finetune.workers=0",
        "finetune.device=cpu", "cleaner.subset_size=2", "cleaner.hidden=16", "cleaner.weighting=fc_fc_relu_sig",
        "finetune.batch_size=4")
ONE = (*KEYS, "finetune.epochs=2", "finetune.unload_epochs=1", "finetune.checkpoint_minutes=0")  # one process
EVERY_STEP = (*KEYS, "finetune.epochs=2", "finetune.checkpoint_minutes=1e-9")  # a checkpoint after every step
STOPPED = re.compile(r"^stopped on (SIG\w+|another rank's signal): checkpoint at epoch (\d+) of (\d+), step (\d+) "
                     r"of (\d+) written to (.+checkpoint\.pt); run the same command with --resume .*$")


def sets(data: Path, *keys: str) -> list[str]:
    return [a for k in ("data.source=imagefolder", f"data.root={data}", *keys) for a in ("--set", k)]


def finetune_cmd(data: Path, out: Path, *args: str, keys: tuple[str, ...] = ONE, log: str = "warning") -> list[str]:
    return ["finetune", "--no-progress", "--log-level", log, "--out", str(out), *args, *sets(data, *keys)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def timeless(m: dict) -> dict:
    return json.loads(json.dumps(m), object_hook=lambda d: {k: v for k, v in d.items()
                                                            if k not in ("seconds", "images_per_second")})


def same_run(a: Path, b: Path, why: str) -> None:
    """Two finetune runs hold the same metrics (timings aside), model.pt and confusion.csv."""
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert timeless(ma) == timeless(mb), why
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), why
    assert (a / "confusion.csv").read_bytes() == (b / "confusion.csv").read_bytes(), why


def position(run: Path, world: int = 1) -> tuple[int, int]:
    """(epochs completed, steps of the next) of ``run``'s checkpoint, loaded as --resume loads it."""
    ckpt = checkpoint.load(run, torch.device("cpu"), (run / "config.toml").read_text(), world=world)
    return ckpt.epoch, ckpt.step


def stop_line(err: str, why: str) -> re.Match:
    last = err.strip().splitlines()[-1] if err.strip() else ""
    m = STOPPED.match(last)
    assert m, f"{why}: {err[-3000:]}"
    return m


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_noisy_colour_images(tmp_path_factory.mktemp("ftp") / "data", {"train": 8, "val": 4, "test": 3})


class Background:
    """An uninterrupted run, started with --resume auto on an --out that does not exist yet (so it starts fresh),
    alongside the test's other runs; ``done()`` waits for it."""

    def __init__(self, cmd: list[str], out: Path):
        self.out = out
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def done(self) -> Path:
        _, err = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, err[-3000:]
        return self.out


@pytest.fixture(scope="module")
def ref(data, tmp_path_factory) -> Background:
    out = tmp_path_factory.mktemp("ref") / "run"
    return Background([sys.executable, "-m", "mcpipe", *finetune_cmd(data, out, "--resume", "auto")], out)


@pytest.mark.slow
def test_signals_stop_resumably_and_resume_auto_finishes_the_same_run(data, ref, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "run"
    # a DataLoader worker, signalled with the rest of the process group, must not end the run
    cmd = [sys.executable, "-m", "mcpipe", *finetune_cmd(data, out, "--resume", "auto",  # nothing there yet
                                                         keys=(*ONE, "finetune.workers=1"))]

    # SIGTERM while step k pauses (after its update, before its checks): the step is checkpointed, the run stops
    k = rng.randint(2, 5)
    why = f"{REPLAY}: SIGTERM at step {k}"
    proc = Proc(cmd, tmp_path / "term", pause_at="finetune_step", pause=0.3)
    assert proc.read_until("test pause at finetune_step", k), (why, proc.wait()[2][-3000:])
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as Slurm signals a job
    rc, _, err = proc.wait()
    m = stop_line(err, why)
    assert rc == EXIT_PREEMPTED and (m[1], int(m[2]), int(m[3]), int(m[4]), int(m[5])) == (
        "SIGTERM", 1, 3, k, STEPS), (why, err[-3000:])
    assert "--resume auto" in m[0] and m[6] == str(out / "checkpoint.pt"), why
    assert_clean(err, why)
    assert position(out) == (0, k), why

    # resumed there; SIGUSR1 while the j-th step after it pauses, SIGTERM 1.5 s later: it stops at once
    j = rng.randint(1, 4)
    why += f"; SIGUSR1 + SIGTERM at step {k} + {j}"
    proc = Proc(cmd, tmp_path / "twice", pause_at="finetune_step", pause=SAME_SIGNAL_SECONDS + 2.0)
    assert proc.read_until("test pause at finetune_step", j), (why, proc.wait()[2][-3000:])
    os.killpg(proc.pid, signal.SIGUSR1)
    time.sleep(SAME_SIGNAL_SECONDS + 0.5)  # a repeat within a second would be the same request
    os.killpg(proc.pid, signal.SIGTERM)
    rc, _, err = proc.wait()
    assert rc == 130 and err.strip().splitlines()[-1].startswith("interrupted"), (why, err[-3000:])
    assert_clean(err, why)
    last = (0, k) if k + j <= STEPS else (1, 0)  # step k's, or epoch 1's end if the run got past it
    assert position(out) == last, why  # the last checkpoint stands, loadable
    acquire(out / ".lock", what="run", writer="test").release()  # and the run folder is free

    res = run(cmd)  # the same command again, as a requeued job runs it
    assert res.returncode == 0, (why, res.stderr[-3000:])
    same_run(ref.done(), out, why)
    assert not list(out.glob(".*.tmp-*")), why
    print(why)


runner = CliRunner()


def invoke(data: Path, out: Path, *args: str, keys: tuple[str, ...] = ONE):
    """In this process, warnings off: what is left on the terminal is the one line of a refusal."""
    return runner.invoke(app, finetune_cmd(data, out, *args, keys=keys, log="error"))


@pytest.fixture(scope="module")
def full_disk(data, tmp_path_factory):
    """An in-process run (a checkpoint after every step) whose second checkpoint meets a full disk: its output
    and the folder it left."""
    real, writes = torch.save, []

    def full_on_the_second(obj, f, *args, **kwargs):
        if Path(getattr(f, "name", "")).name.startswith(".checkpoint.pt.tmp-"):
            writes.append(f.name)
            if len(writes) == 2:
                f.write(b"\0" * 4096)  # part of it, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    out = tmp_path_factory.mktemp("full") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", full_on_the_second)
        res = invoke(data, out, keys=EVERY_STEP)
    return res, out


def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one(full_disk):
    res, out = full_disk
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0] == (f"error: cannot write {out / 'checkpoint.pt'}: No space left on device; free some space; "
                        "the previous version, if any, is kept"), res.output
    assert position(out) == (0, 1)  # the checkpoint after step 1, loadable
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt", "config.toml"]  # no temporary
    acquire(out / ".lock", what="run", writer="test").release()  # released on the way out


def test_a_truncated_or_version_1_checkpoint_is_refused_with_one_line(data, full_disk, tmp_path):
    _, stopped = full_disk
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(stopped / "config.toml", out)
    good = (stopped / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    res = invoke(data, out, "--resume", keys=EVERY_STEP)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith(f"error: --resume: {out / 'checkpoint.pt'} cannot be read: "), res.output

    old = torch.load(stopped / "checkpoint.pt", weights_only=True)  # as version 1 wrote it: no position, no version
    for key in ("version", "mcpipe", "step", "partial", "partial_seconds", "world"):
        del old[key]
    torch.save(old, out / "checkpoint.pt")
    res = invoke(data, out, "--resume", "auto", keys=EVERY_STEP)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert "is a version-1 finetune checkpoint, written by an earlier mcpipe; this mcpipe (" in lines[0]
    assert lines[0].endswith("reads version 2: --overwrite to start again"), res.output


# --------------------------------------------------------------------------- torchrun


TWO = (*KEYS, "finetune.epochs=1", "finetune.unload_epochs=1", "finetune.checkpoint_minutes=0")  # 3 steps a rank
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mcpipe"]


@pytest.mark.slow
def test_under_torchrun_a_sigterm_stops_both_ranks_at_one_step_and_resume_finishes_the_same_run(data, tmp_path):
    whole = subprocess.Popen([*TORCHRUN, *finetune_cmd(data, tmp_path / "ref", keys=TWO)], env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # alongside the interrupted one
    done = random.Random(SEED).randint(1, 5)  # steps of the 6 (3 a rank in each of 2 epochs) before the signal
    epoch, step = (done - 1) // 3 + 1, (done - 1) % 3 + 1
    why = f"{REPLAY}: SIGTERM to torchrun at step {step} of epoch {epoch}"
    out = tmp_path / "run"
    cmd = [*TORCHRUN, *finetune_cmd(data, out, "--resume", "auto", keys=TWO)]
    proc = Proc(cmd, tmp_path / "logs", pause_at="finetune_step", pause=0.5)
    assert proc.read_until("test pause at finetune_step", 2 * done - 1), (why, proc.wait()[2][-3000:])  # 1st rank
    os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to each rank
    _, _, err = proc.wait(timeout=120)  # a rank waiting for the other forever would time out here
    stops = [STOPPED.match(line.split("]:", 1)[-1].strip()) for line in err.splitlines() if "stopped on" in line]
    assert len(stops) == 2 and all(stops), (why, err[-3000:])
    assert {(s[2], s[4], s[5]) for s in stops} == {(str(epoch), str(step), "3")}, (why, err[-3000:])  # one step
    assert not re.search(r'File ".*/(mcpipe|finetune|extract)/', err), (why, err[-3000:])  # torchrun's own only
    assert position(out, world=2) == (epoch - 1, step), why
    res = run(cmd)
    if res.returncode != 0:  # the whole of it in the failure's captured output (the assertion's is cut short)
        print(why, res.stderr, sep="\n")
    assert res.returncode == 0, (why, res.stderr[-3000:])
    stdout, stderr = whole.communicate(timeout=TIMEOUT)
    assert whole.returncode == 0, stderr[-3000:]
    ref = tmp_path / "ref"
    m = json.loads((ref / "metrics.json").read_text())
    assert [h["phase"] for h in m["history"]] == ["cleaner", "unload"]
    assert m["history"][0]["test_images"] == 9  # the two test shards add up to the whole split
    assert m["history"][0]["val_images"] == 12 and m["chosen_on"] == "val"  # and so do the two val shards
    load_model(ref)
    assert stdout.count("test top-1") == 1  # only rank 0 reports
    same_run(ref, out, why)
    print(why)
