"""mcpipe extract killed, preempted and restarted at once: never refused, never a row lost or written twice.

* The newcomer's check: ``kill -9`` of ``mcpipe extract`` (1,200 small PNGs, default DataLoader workers) and
  the same command again at once: it resumes, and the store equals an uninterrupted run's. (Its workers,
  orphaned, used to keep the store's lock and the open store for seconds: the re-run was refused.)
* Fault injection, seeded: ``kill -9`` of the main process, and SIGTERM / SIGUSR1 to the whole process group
  (as Slurm sends them), during start-up, mid-run, while a store block is written and while a store is
  completed, one after the other on the same output, each run started as soon as the last one ended, then
  one run to the end: the stores equal the uninterrupted run's bit for bit. The points come from
  ``random.Random(SEED)``; a failure names the seed, and ``MCPIPE_FAULT_SEED=<seed>`` replays it. A
  point inside the store writer is reached through the test hook ``MCPIPE_TEST_PAUSE_AT`` (``mcpipe.faults``).
* Under torchrun a SIGTERM stops every rank after its block in flight, none waiting for another.
* In-process: forked children hold neither a lock nor an open store; the refusal message never names a dead
  process; a lock is released when the work holding it fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fixtures_data import make_noisy_colour_images
from mcpipe.errors import DataError
from mcpipe.locks import acquire, detach_in_children, keep_in_children, refuse_if_locked
from mcpipe.rundir import start_run_dir
from mcpipe.stopping import EXIT_PREEMPTED, SAME_SIGNAL_SECONDS
from mcpipe.store.writer import StoreSpec, StoreWriter
from conftest import mcpipe, sets
from test_interrupt import ENV, TIMEOUT, assert_same_store, extracted, leftovers

SEED = int(os.environ.get("MCPIPE_FAULT_SEED", "14"))
REPLAY = f"seed {SEED} (MCPIPE_FAULT_SEED={SEED} replays it)"
PAUSE = 0.3  # seconds a run sleeps at a test pause point; the signal lands inside it
SMALL = {"train": 3 * 96, "test": 3 * 16}  # rows of the fault-injection stores, in blocks of 8
BIG = {"train": 1200}  # the newcomer's check: 1,200 PNGs, default block size (64)
LINUX = sys.platform.startswith("linux")


# --------------------------------------------------------------------------- processes


def extract_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    """Default DataLoader workers (forked, and killed or signalled with the run), a commit after every block."""
    return mcpipe("extract", "--no-progress", "--log-level", "debug", "--out", str(out), *sets(
        "data.source=imagefolder", f"data.root={root}", "extract.backbone=resnet18", "extract.weights=none",
        "extract.image_size=32", "extract.device=cpu", "store.sync_seconds=0", *extra))


def small_cmd(data: Path, out: Path) -> list[str]:
    return extract_cmd(data / "small", out, "extract.batch_size=8")


class Proc:
    """``cmd`` in a process group of its own (its workers with it), as a batch system starts a job. Its output
    goes to files, not pipes: the test must not wait for the end of a pipe that orphaned workers still hold
    (that wait is what would let them die before the re-run), only for the process itself."""

    def __init__(self, cmd: list[str], logs: Path, *, pause_at: str = "", pause: float = PAUSE):
        env = {**ENV, "MCPIPE_TEST_PAUSE_AT": pause_at, "MCPIPE_TEST_PAUSE_SECONDS": str(pause)} if pause_at else ENV
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / "stdout", logs / "stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True)
        self.pid = self.popen.pid
        self._err = open(self.err_path, encoding="utf-8", errors="replace")
        self._partial = ""

    def lines(self):
        """Stderr lines as they come, until the process has ended and all is read."""
        while True:
            chunk = self._err.readline()
            if chunk.endswith("\n"):
                yield self._partial + chunk
                self._partial = ""
            elif chunk:
                self._partial += chunk
            elif self.popen.poll() is not None:
                if self._partial:
                    yield self._partial
                return
            else:
                time.sleep(0.01)

    def read_until(self, pattern: str | None, count: int) -> bool:
        """Read stderr up to the ``count``-th line matching ``pattern``; False if the run ended first."""
        if pattern is None:
            return True
        seen = 0
        for line in self.lines():
            seen += bool(re.search(pattern, line))
            if seen == count:
                return True
        return False

    def wait(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of the process itself, its orphans left alone."""
        rc = self.popen.wait(timeout=timeout)
        self._err.close()
        return rc, self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace")


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (its DataLoader workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def open_files(pid: int) -> list[str]:
    """What ``pid``'s descriptors point to ([] once it has exited)."""
    targets = []
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            targets.append(os.readlink(fd))
        except OSError:
            pass
    return targets


class Step:
    """One interrupted run: ``sig`` sent ``delay`` s after the ``count``-th stderr line matching ``pattern``
    (after the start when ``pattern`` is None); SIGKILL goes to the main process only (its workers are
    orphaned, as after the OOM killer or ``kill -9 PID``), other signals to the whole process group."""

    def __init__(self, point: str, sig: signal.Signals, *, pattern: str | None, count: int, delay: float,
                 pause_at: str = "", twice: bool = False):
        self.point, self.sig, self.pattern, self.count, self.delay = point, sig, pattern, count, delay
        self.pause_at, self.twice = pause_at, twice
        self.returncode, self.stdout, self.stderr, self.reached = 0, "", "", True
        self.workers: list[int] = []

    def run(self, cmd: list[str], logs: Path) -> "Step":
        # a second signal counts only SAME_SIGNAL_SECONDS after the first: pause long enough for both to land
        proc = Proc(cmd, logs, pause_at=self.pause_at, pause=SAME_SIGNAL_SECONDS + 0.6 if self.twice else PAUSE)
        self.reached = proc.read_until(self.pattern, self.count)
        if self.reached:
            time.sleep(self.delay)
            self.workers = children(proc.pid) if LINUX else []
            if self.sig == signal.SIGKILL:
                os.kill(proc.pid, signal.SIGKILL)
            else:
                os.killpg(proc.pid, self.sig)
                if self.twice:
                    time.sleep(SAME_SIGNAL_SECONDS + 0.2)  # the writer is still in its pause
                    os.killpg(proc.pid, self.sig)
        self.returncode, self.stdout, self.stderr = proc.wait()
        return self

    def __str__(self) -> str:
        where = f"line {self.count} ~ {self.pattern!r}" if self.pattern else "the start"
        twice = " twice" if self.twice else ""
        return f"{self.point}: {self.sig.name}{twice} {self.delay * 1000:.0f} ms after {where} -> {self.returncode}"


def written(out: Path, split: str) -> np.ndarray:
    path = out / f"{split}.h5"
    if not path.exists():
        return np.zeros(0, dtype=bool)
    with h5py.File(path, "r") as f:
        return f["written"][:]


def pending(out: Path, rows: dict[str, int]) -> int:
    """Rows not yet flagged as written, over every split (a store not created yet counts whole)."""
    return sum(n - int(written(out, s).sum()) for s, n in rows.items())


def assert_flagged_rows_match(out: Path, ref: Path, rows: dict[str, int], why: str) -> None:
    """Every row flagged as written already holds the uninterrupted run's bytes."""
    for split in rows:
        if (out / f"{split}.h5").exists():
            with h5py.File(out / f"{split}.h5", "r") as a, h5py.File(ref / f"{split}.h5", "r") as b:
                done = a["written"][:]
                assert a["features"][:][done].tobytes() == b["features"][:][done].tobytes(), f"{why}: {split}"


STOPPED = re.compile(r"^stopped on (SIG\w+|another rank's signal): ([\d,]+) of ([\d,]+) rows of (\w+)\.h5 written "
                     r"\((.+)\); run the same command again to resume$")


def stop_line(stderr: str) -> re.Match:
    """The one line a preempted run ends with."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    m = STOPPED.match(last)
    assert m, last
    return m


def assert_clean(stderr: str, why: str) -> None:
    for bad in ("Traceback", "Exception ignored", "DataLoader worker", "another process", "is locked"):
        assert bad not in stderr, f"{why}: {bad!r} in\n{stderr[-3000:]}"


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preempt")
    make_noisy_colour_images(root / "big", {"train": BIG["train"] // 3})
    make_noisy_colour_images(root / "small", {s: n // 3 for s, n in SMALL.items()})
    return root


class Reference:
    """The uninterrupted run of a command, started at once beside the tests, waited for where compared."""

    def __init__(self, cmd: list[str], out: Path):
        self.out, self.proc = out, Proc(cmd, out.with_name(out.name + "-logs"))

    def done(self) -> Path:
        rc, _, err = self.proc.wait()
        assert rc == 0, err[-3000:]
        return self.out


@pytest.fixture(scope="module")
def refs(data) -> dict[str, Reference]:
    """Both uninterrupted runs, started together (one process uses little more than a core)."""
    return {"big": Reference(extract_cmd(data / "big", data / "big-ref"), data / "big-ref"),
            "small": Reference(small_cmd(data, data / "small-ref"), data / "small-ref")}


@pytest.fixture(scope="module")
def small_ref(refs) -> Reference:
    return refs["small"]


@pytest.fixture(scope="module")
def big_ref(refs) -> Reference:
    return refs["big"]


# --------------------------------------------------------------------------- the newcomer's check


@pytest.mark.slow
def test_kill9_then_the_same_command_at_once_resumes_to_the_uninterrupted_store(data, big_ref, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "out"
    cmd = extract_cmd(data / "big", out)
    step = Step("mid-run", signal.SIGKILL, pattern="committed blocks", count=rng.randint(2, 9),
                delay=rng.uniform(0.0, 0.05)).run(cmd, tmp_path / "logs")
    why = f"{REPLAY}: {step}"
    assert step.returncode == -signal.SIGKILL, f"{why}: the run ended first\n{step.stderr[-3000:]}"
    orphans = [pid for pid in step.workers if os.path.exists(f"/proc/{pid}")]
    store = str(out / "train.h5")
    for pid in orphans:  # the killed run's workers may live on for seconds: they must hold nothing of the store
        assert not [t for t in open_files(pid) if t.startswith(store) or t.endswith(".train.h5.lock")], why
    before = pending(out, BIG)
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)  # at once
    assert res.returncode == 0, f"{why}; {len(orphans)} orphaned workers\n{res.stderr[-3000:]}"
    assert_clean(res.stderr, why)
    assert 0 < before < BIG["train"] and extracted(res.stdout) == before, (why, before, res.stdout)
    assert_same_store(big_ref.done() / "train.h5", out / "train.h5")
    assert not leftovers(out), leftovers(out)
    print(f"newcomer check ({REPLAY}): {step}; {BIG['train'] - before} rows kept, {before} redone, "
          f"{len(orphans)} orphaned workers still alive at the re-run")


# --------------------------------------------------------------------------- fault injection


def seeded_steps(rng: random.Random) -> list[Step]:
    """kill -9 and a signal at each point, in this order, on one output; times and counts from ``rng``. (kill -9
    mid-run is the newcomer's check above.)"""
    kill, term, usr1 = signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1
    built, commit = "random initialisation", "committed blocks"  # the model is built: the store comes next
    write, complete = "test pause at block_write", "test pause at store_complete"
    return [
        Step("start-up", kill, pattern=built, count=1, delay=rng.uniform(0.0, 0.3)),
        Step("start-up", usr1, pattern=built, count=1, delay=rng.uniform(0.0, 0.3)),
        Step("mid-run", term, pattern=commit, count=rng.randint(2, 6), delay=rng.uniform(0.0, 0.05)),
        Step("block write", kill, pattern=write, count=rng.randint(1, 3), delay=rng.uniform(0.0, PAUSE * 0.8),
             pause_at="block_write"),
        Step("block write", usr1, pattern=write, count=rng.randint(1, 3), delay=rng.uniform(0.0, PAUSE * 0.4),
             pause_at="block_write"),
        Step("block write", term, pattern=write, count=rng.randint(1, 3), delay=rng.uniform(0.0, PAUSE * 0.4),
             pause_at="block_write", twice=True),
        Step("completion", kill, pattern=complete, count=1, delay=rng.uniform(0.0, PAUSE * 0.8),
             pause_at="store_complete"),
        Step("completion", term, pattern=complete, count=1, delay=rng.uniform(0.0, PAUSE * 0.8),
             pause_at="store_complete"),
    ]


def check_step(step: Step, out: Path, before: int, why: str) -> None:
    """What an interrupted run must have left: exit status and message as documented, nothing lost."""
    kept = before - pending(out, SMALL)
    if not step.reached:  # the run got past the point before it came: it must have finished
        assert step.returncode == 0, f"{why}\n{step.stderr[-3000:]}"
        return
    if step.sig == signal.SIGKILL:
        assert step.returncode == -signal.SIGKILL, f"{why}: the run ended first\n{step.stderr[-3000:]}"
        return
    assert_clean(step.stderr, why)
    if step.twice:  # the second signal stops at once, like Ctrl-C
        assert step.returncode == 130, f"{why}\n{step.stderr[-3000:]}"
        assert step.stderr.strip().splitlines()[-1].startswith("interrupted: what was written is kept"), why
        assert kept >= 8, why  # the block being written when it came was finished, not cut off
    elif step.point == "completion" and step.returncode == 0:
        assert pending(out, SMALL) == 0, why  # the last store finished rather than left incomplete
    else:
        assert step.returncode == EXIT_PREEMPTED, f"{why}\n{step.stderr[-3000:]}"
        m = stop_line(step.stderr)
        split, rows = m[4], int(m[2].replace(",", ""))
        assert m[1] == step.sig.name and int(m[3].replace(",", "")) == SMALL[split], why
        assert m[5] == str(out / f"{split}.h5") and rows == int(written(out, split).sum()), (why, m[0])
        assert pending(out, SMALL) <= before, why


@pytest.mark.slow
def test_interrupted_at_seeded_points_and_restarted_at_once_gives_the_uninterrupted_stores(data, small_ref, tmp_path):
    rng = random.Random(SEED)
    ref = small_ref.done()  # before the first kill: every partial store is compared with it
    out = tmp_path / "out"
    cmd = small_cmd(data, out)
    tried = []
    for i, step in enumerate(seeded_steps(rng)):
        before = pending(out, SMALL)
        step.run(cmd, tmp_path / f"logs{i}")
        kept = before - pending(out, SMALL)
        tried.append(f"{step}, {kept} rows kept" if step.reached else f"{step.point}: the run ended before it")
        why = f"{REPLAY}: " + "; ".join(tried)
        check_step(step, out, before, why)
        assert_flagged_rows_match(out, ref, SMALL, why)
    before = pending(out, SMALL)
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    why = f"{REPLAY}: " + "; ".join(tried)
    assert res.returncode == 0, f"{why}\n{res.stderr[-3000:]}"
    assert_clean(res.stderr, why)
    assert extracted(res.stdout) == before, (why, res.stdout)  # exactly the rows not flagged, none twice
    for split in SMALL:
        assert_same_store(ref / f"{split}.h5", out / f"{split}.h5")
    assert not leftovers(out), leftovers(out)
    print(f"extract ({REPLAY}):", "; ".join(tried))


# --------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_under_torchrun_a_sigterm_stops_every_rank_after_its_block_and_the_rerun_finishes(data, small_ref, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *small_cmd(data, out)[1:]]  # "-m mcpipe extract ..."
    proc = Proc(cmd, tmp_path / "logs")
    assert proc.read_until("committed blocks", 3), proc.wait()[2][-3000:]
    os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to each rank's process group
    _, _, err = proc.wait(timeout=120)  # a rank waiting for another forever would time out here
    stops = [STOPPED.match(line.split("]:", 1)[-1].strip()) for line in err.splitlines() if "stopped on" in line]
    assert len(stops) == 2 and all(stops), err[-3000:]
    assert {m[0] for m in stops} == {stops[0][0]} and stops[0][4] == "train", err[-3000:]  # one count, both ranks
    shards = sorted((out / ".shards").glob("train.rank*-of-2.h5"))
    assert len(shards) == 2 and int(stops[0][2].replace(",", "")) == sum(
        int(written(s.parent, s.stem).sum()) for s in shards), err[-3000:]
    assert not re.search(r'File ".*/(mcpipe|extract|store)/', err), err[-3000:]  # torchrun's own traceback only
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = small_ref.done()
    for split in SMALL:
        assert_same_store(ref / f"{split}.h5", out / f"{split}.h5")
    assert not list((out / ".shards").glob("*.h5"))


@pytest.mark.slow
def test_under_torchrun_max_restarts_a_rank_killed_minus_9_is_restarted_and_the_extraction_resumes(
        data, small_ref, tmp_path):
    """The out-of-memory killer takes one rank: torchrun (--max-restarts) restarts the group, which meets in a
    fresh rendezvous (not the killed attempt's keys), resumes from the shards and finishes the store."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           *small_cmd(data, out)[1:]]
    proc = Proc(cmd, tmp_path / "logs")
    assert proc.read_until("committed blocks", 2), proc.wait()[2][-3000:]
    ranks = [pid for pid in children(proc.pid) if "mcpipe" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    try:
        rc, _, err = proc.wait(timeout=180)  # a restarted group waiting on the old attempt's keys would time out
    finally:
        if proc.popen.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, err[-6000:]
    assert "exitcode: -9" in err and err.count("rank 1 of 2 joined") == 2, err[-3000:]  # killed, then restarted
    ref = small_ref.done()
    for split in SMALL:
        assert_same_store(ref / f"{split}.h5", out / f"{split}.h5")
    assert not list((out / ".shards").glob("*.h5"))


# --------------------------------------------------------------------------- in-process


def test_an_interrupted_close_of_the_writer_thread_waits_for_the_block_being_written():
    """A second signal (KeyboardInterrupt) while the queued blocks are written: the block being written is
    finished, no further one is begun, and only then does the interruption go on (to close the store)."""
    from mcpipe.extract.engine import _WriterThread

    class SlowWriter:
        def __init__(self):
            self.started, self.done, self.writing = [], [], threading.Event()

        def write_block(self, b, features, codes):
            self.started.append(b)
            self.writing.set()
            time.sleep(0.4)
            self.done.append(b)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    writer = SlowWriter()
    bg = _WriterThread(writer)
    for b in range(3):
        bg.put((b, torch.zeros(2, 4), None, np.zeros(2, np.uint8)))
    assert writer.writing.wait(60)
    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        with pytest.raises(KeyboardInterrupt):
            bg.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert writer.started == writer.done == [0] and not bg.thread.is_alive()


def tiny_spec(n: int = 8) -> StoreSpec:
    return StoreSpec(ids=[f"img{i}" for i in range(n)], labels=np.arange(n) % 2, clean_labels=np.full(n, -1),
                     feature_dim=4, dtype="float32", block_rows=2, chunk_rows=4,
                     attrs={"source_fingerprint": "s", "config_fingerprint": "c"})


def fork_child(fds: list[int]) -> tuple[int, list[str]]:
    """Fork a child that says where ``fds`` point in it, then lives on (like a worker whose parent was killed)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no torch, only this
        try:
            os.write(w, json.dumps([os.readlink(f"/proc/self/fd/{fd}") for fd in fds]).encode())
            os.close(w)
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        return pid, json.loads(f.read() or b"null")


def end(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd")
def test_a_forked_child_holds_neither_the_lock_nor_the_open_store(tmp_path):
    path = tmp_path / "train.h5"
    writer = StoreWriter.open(path, tiny_spec(), sync_seconds=0)
    lock_fd, store_fd = writer._lock._fd, writer._fd
    pid, targets = fork_child([lock_fd, store_fd])
    try:
        assert targets == [os.devnull, os.devnull]  # in the child; the parent's are untouched:
        assert os.readlink(f"/proc/self/fd/{lock_fd}").endswith(".train.h5.lock")
        writer.write_block(0, np.ones((2, 4), np.float32), np.zeros(2, np.uint8))
        writer.close()
        # the child lives on: were it holding the lock or HDF5's lock on the file, these would be refused
        with StoreWriter.open(path, tiny_spec(), sync_seconds=0) as again:
            assert again.pending_blocks() == [1, 2, 3]
        h5py.File(path, "r").close()
    finally:
        end(pid)


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd")
def test_a_descriptor_closed_without_unregistering_is_left_alone(tmp_path):
    a = os.open(tmp_path / "a", os.O_RDWR | os.O_CREAT)
    detach_in_children(a)
    os.close(a)  # a bug in the caller: the number is free and comes back for another file
    b = os.open(tmp_path / "b", os.O_RDWR | os.O_CREAT)
    try:
        assert b == a
        pid, targets = fork_child([b])
        end(pid)
        assert targets == [str(tmp_path / "b")]  # not replaced: it is not the file that was registered
    finally:
        keep_in_children(b)
        os.close(b)


def test_the_refusal_names_a_live_writer_and_never_a_dead_one(tmp_path):
    path = tmp_path / ".train.h5.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # held, whatever pid the file names
    dead = subprocess.Popen(["true"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", ""])
    try:
        while LINUX and Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            time.sleep(0.01)  # exited, not reaped
        cases = {f"{os.getpid()}": True, f"{dead.pid}": False, f"{os.getpid()} 1": not LINUX}
        if LINUX:
            cases[f"{zombie.pid}"] = False
        for text, alive in cases.items():
            path.write_text(f"{text}\n")
            pid = text.split()[0]
            for refuse in (lambda: acquire(path, what="store x.h5", writer="mcpipe extract"),
                           lambda: refuse_if_locked(path, what="store x.h5", writer="mcpipe extract")):
                with pytest.raises(DataError) as exc:
                    refuse()
                msg = str(exc.value)
                if alive:
                    assert f"is being written by another process (mcpipe extract, pid {pid})" in msg, msg
                else:
                    assert "being written by another process" not in msg, msg
                    assert f"(mcpipe extract, pid {pid}) has exited" in msg and "try again in a few seconds" in msg
    finally:
        os.close(holder)
        zombie.wait()


def test_a_lock_is_released_when_the_work_holding_it_fails(tmp_path):
    lock = tmp_path / ".x.lock"
    with pytest.raises(RuntimeError):
        with acquire(lock, what="x", writer="test"):
            raise RuntimeError
    acquire(lock, what="x", writer="test").release()

    store = tmp_path / "train.h5"
    with pytest.raises(RuntimeError):
        with StoreWriter.open(store, tiny_spec(), sync_seconds=0) as writer:
            writer.write_block(0, np.ones((2, 4), np.float32), np.zeros(2, np.uint8))
            raise RuntimeError
    with StoreWriter.open(store, tiny_spec(), sync_seconds=0) as writer:  # not refused, and block 0 is kept
        assert writer.pending_blocks() == [1, 2, 3]

    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with start_run_dir(run, "config", ("head.pt",), resume=False, overwrite=False):
            raise RuntimeError
    with start_run_dir(run, "config", ("head.pt",), resume=False, overwrite=False):
        pass
