"""Interruptions lose nothing: real mcpipe processes killed, refused, starved of disk, then resumed.

* ``kill -9`` of ``mcpipe extract``, ``train-head`` and ``finetune`` at three points each, one after the
  other on the same output, then one run to the end: the result equals an uninterrupted run bit for bit
  (store rows; head.pt / model.pt tensors; metrics without their timings). A kill point is a log
  milestone (k committed blocks, the checkpoint of epoch k, the first line a run prints) plus a random
  delay after it, both drawn from ``random.Random(SEED)``: the process dies at an arbitrary instruction
  near a known place, and the outcome does not depend on where.
* A second writer of the same store or run folder is refused with one line while the first goes on.
* A file-size limit, a read-only folder and a full file system are one line (exit 1, no traceback)
  naming the file, and the same command finishes the work once there is room.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import mcpipe, sets
from fixtures_data import make_noisy_colour_images
from mcpipe.cli import app
from mcpipe.errors import DataError
from mcpipe.locks import acquire
from mcpipe.atomic import save_atomic, write_json_atomic
from mcpipe.store.synthetic import write_synthetic_store

SEED = 0
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 300
TRAIN_ROWS, TEST_ROWS, BLOCK = 48, 24, 2  # extract: 3 classes x 16 / x 8 images, one block per batch of 2
TIMINGS = {"seconds", "images_per_second"}


# --------------------------------------------------------------------------- processes


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def start(cmd: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def read_until(proc: subprocess.Popen, pattern: str, count: int) -> list[str]:
    """Lines of ``proc``'s stderr up to the ``count``-th one matching ``pattern`` (all of them if it ends first)."""
    lines, seen = [], 0
    for line in proc.stderr:
        lines.append(line)
        seen += bool(re.search(pattern, line))
        if seen == count:
            break
    return lines


def kill9_at(cmd: list[str], cwd: Path, *, pattern: str, count: int, delay: float) -> None:
    """Run ``cmd``; ``delay`` seconds after the ``count``-th stderr line matching ``pattern``, kill -9 it."""
    proc = start(cmd, cwd)
    lines = read_until(proc, pattern, count)
    time.sleep(delay)
    proc.kill()
    _, rest = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended ({proc.returncode}) before the kill at line {count} matching {pattern!r} + {delay:.3f} s:\n"
        + "".join(lines) + rest)


class Background:
    """A command running to completion beside the test (an uninterrupted reference run)."""

    def __init__(self, cmd: list[str], cwd: Path):
        self.proc = start(cmd, cwd)
        self.stderr = ""

    def wait(self) -> None:
        if self.proc.returncode is None:
            self.stderr = self.proc.communicate(timeout=TIMEOUT)[1]
        assert self.proc.returncode == 0, self.stderr[-3000:]


def the_error(res: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused command: exit 1, no traceback."""
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def no_timings(obj):
    if isinstance(obj, dict):
        return {k: no_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [no_timings(v) for v in obj]
    return obj


def leftovers(folder: Path) -> list[str]:
    """Temporary files a killed writer may leave: a later run must have cleared them."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    make_noisy_colour_images(root / "images", {"train": TRAIN_ROWS // 3, "test": TEST_ROWS // 3}, size=40)
    make_noisy_colour_images(root / "small", {"train": 8, "val": 4, "test": 3})
    return root


def extract_cmd(work: Path, out: Path) -> list[str]:
    return mcpipe("extract", "--no-progress", "--log-level", "debug", "--out", str(out), *sets(
        "data.source=imagefolder", f"data.root={work / 'images'}", "extract.backbone=resnet18",
        "extract.weights=none", "extract.image_size=32", f"extract.batch_size={BLOCK}", "extract.device=cpu",
        "extract.num_workers=0", "store.sync_seconds=0"))


@pytest.fixture(scope="module")
def extract_ref(work):
    """The uninterrupted extraction, started at once and waited for where it is compared."""
    return Background(extract_cmd(work, work / "ref"), work), work / "ref"


def pending_rows(out: Path) -> int:
    """Rows of both splits not yet flagged as written (a store not created yet counts whole)."""
    total = 0
    for split, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        path = out / f"{split}.h5"
        if not path.exists():
            total += rows
            continue
        with h5py.File(path, "r") as f:
            total += int((~f["written"][:]).sum())
    return total


def extracted(stdout: str) -> int:
    """Images run through the network by one extract command, from its summary lines."""
    return sum(int(n.replace(",", "")) for n in re.findall(r"; ([\d,]+) extracted", stdout))


def assert_written_rows_match(out: Path, ref: Path) -> None:
    """A partial store: every row flagged as written already holds the uninterrupted run's bytes."""
    for split in ("train", "test"):
        if not (out / f"{split}.h5").exists():
            continue
        with h5py.File(out / f"{split}.h5", "r") as a, h5py.File(ref / f"{split}.h5", "r") as b:
            done = a["written"][:]
            assert a["features"][:][done].tobytes() == b["features"][:][done].tobytes(), split


def assert_same_store(a: Path, b: Path) -> None:
    """``b`` holds ``a``'s rows bit for bit, in the same order, each once, and is complete."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert sorted(fa) == sorted(fb)
        for name in fa:
            x, y = fa[name][:], fb[name][:]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            if x.dtype.kind == "O":
                assert list(x) == list(y), name
            else:
                assert x.tobytes() == y.tobytes(), f"{b}: {name} differs"
        ids = list(fb["ids"].asstr()[:])
        assert len(set(ids)) == len(ids), "a row is there twice"
        assert bool(fb.attrs["complete"]) and fb["written"][:].all()
        assert set(fa.attrs) == set(fb.attrs)
        for key in fa.attrs:
            if key != "created_unix":
                assert np.array_equal(fa.attrs[key], fb.attrs[key]), key


def assert_same_stores(ref: Path, out: Path) -> None:
    for split in ("train", "test"):
        assert_same_store(ref / f"{split}.h5", out / f"{split}.h5")
    assert not leftovers(out), leftovers(out)


# --------------------------------------------------------------------------- extract


@pytest.mark.slow
def test_extract_killed_at_seeded_points_resumes_to_the_uninterrupted_stores(work, extract_ref, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "out"
    cmd = extract_cmd(work, out)
    points = []
    for _ in range(3):
        before = pending_rows(out)
        blocks = rng.randint(1, max(1, before // BLOCK // 2))  # committed by this run; half or more still to do
        delay = rng.uniform(0.0, 0.03)
        kill9_at(cmd, work, pattern="committed blocks", count=blocks, delay=delay)
        points.append(f"{blocks} blocks + {delay * 1000:.0f} ms: {before - pending_rows(out)} rows kept")
        assert pending_rows(out) < before
        extract_ref[0].wait()
        assert_written_rows_match(out, extract_ref[1])
    print("extract kill points:", "; ".join(points))
    before = pending_rows(out)
    res = run(cmd, work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert extracted(res.stdout) == before  # exactly the rows not flagged, none twice
    assert_same_stores(extract_ref[1], out)


@pytest.mark.slow
def test_a_second_extract_of_the_same_store_is_refused(work, extract_ref, tmp_path):
    out = tmp_path / "out"
    first = start(extract_cmd(work, out), work)
    read_until(first, "committed blocks", 1)
    first.send_signal(signal.SIGSTOP)  # holds the store, mid-way, for as long as the second one takes
    try:
        second = run(extract_cmd(work, out), work)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=TIMEOUT)
    line = the_error(second)
    assert f"{out / 'train.h5'} is being written by another process (mcpipe extract, pid {first.pid})" in line, line
    assert first.returncode == 0, err[-3000:]
    extract_ref[0].wait()
    assert_same_stores(extract_ref[1], out)


def read_only(folder: Path) -> list[str]:
    """chmod ``folder`` and its files read-only; returns the prefix of a command that the modes bind.

    Root ignores file modes: its child runs without the capabilities that let it (setpriv), so the
    modes bind it as they bind any user. (Switching to 'nobody' instead fails here: the interpreter
    lives under /root, which only root may enter.)"""
    for p in (folder, *folder.iterdir()):
        p.chmod(0o555 if p.is_dir() else 0o444)
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv(1): no way to make a folder read-only for a child")
    caps = "-dac_override,-dac_read_search,-fowner"
    return [shutil.which("setpriv"), f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


def file_size_limit(limit: int):
    """A ``preexec_fn``: files of the child cannot grow past ``limit`` bytes (EFBIG, as on FAT32 at 4 GiB)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


@pytest.mark.slow
def test_read_only_and_size_limit_are_one_line_and_the_command_resumes(work, extract_ref):
    rng = random.Random(SEED + 3)
    extract_ref[0].wait()
    out = work / "partial"
    shutil.copytree(extract_ref[1], out)
    (out / "test.h5").unlink()
    half = TRAIN_ROWS // BLOCK // 2
    redo = sorted(rng.sample(range(half), 3) + rng.sample(range(half, 2 * half), 3))
    with h5py.File(out / "train.h5", "r+") as f:  # as a killed run leaves it: rows there, flags not set yet
        for b in redo:
            f["written"][b * BLOCK:(b + 1) * BLOCK] = False
            f["features"][b * BLOCK:(b + 1) * BLOCK] = 0
        f.attrs["complete"] = False
        row_bytes = f["features"].shape[1] * f["features"].dtype.itemsize
        middle = f["features"].id.get_chunk_info(0).byte_offset + TRAIN_ROWS // 2 * row_bytes
    snapshot = (out / "train.h5").read_bytes()
    cmd = extract_cmd(work, out)

    refused = run([*read_only(out), *cmd], work)
    for p in (out, *out.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    line = the_error(refused)
    assert str(out / "train.h5") in line and "Permission denied" in line, line
    assert (out / "train.h5").read_bytes() == snapshot  # refused before touching the store

    # no byte past the middle of the features: the first half's rows are redone, then a write fails
    limited = run(cmd, work, preexec_fn=file_size_limit(middle))
    line = the_error(limited)
    assert re.search(rf"cannot write rows \d+-\d+ of {re.escape(str(out / 'train.h5'))}: File too large", line), line
    assert pending_rows(out) == 3 * BLOCK + TEST_ROWS  # the second half's blocks, and test.h5 not begun
    assert_written_rows_match(out, extract_ref[1])

    res = run(cmd, work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert extracted(res.stdout) == 3 * BLOCK + TEST_ROWS
    assert_same_stores(extract_ref[1], out)


# a store on a real file system that fills up: a tmpfs in a mount namespace of its own
ENOSPC_SCRIPT = r"""
import json, subprocess, sys
from pathlib import Path
import h5py, numpy as np
import mcpipe.store.writer as w
from mcpipe.errors import DataError

root, big = Path(sys.argv[1]), sys.argv[2]
n, d = 64, 256
feats = np.random.default_rng(0).standard_normal((n, d)).astype(np.float16)
attrs = {"source_fingerprint": "s", "config_fingerprint": "c"}
spec = w.StoreSpec(ids=[f"img{i:03d}" for i in range(n)], labels=np.arange(n) % 4, clean_labels=np.full(n, -1),
                   feature_dim=d, dtype="float16", block_rows=4, chunk_rows=16, attrs=attrs)
report = {}

def fill(path):
    with w.StoreWriter.open(path, spec, sync_seconds=0) as writer:
        for b in writer.pending_blocks():
            lo, hi = writer.block_range(b)
            writer.write_block(b, feats[lo:hi], np.zeros(hi - lo, np.uint8))

try:  # too little room for the store: refused when it is created
    fill(root / "a.h5")
except DataError as exc:
    report["create"] = str(exc)
report["left"] = sorted(p.name for p in root.iterdir())
reserve, w._reserve = w._reserve, lambda fd, size: None  # a file system that cannot reserve room
try:
    fill(root / "a.h5")
except DataError as exc:
    report["midway"] = str(exc)
w._reserve = reserve
with h5py.File(root / "a.h5", "r") as f:
    report["written_before"] = int(f["written"][:].sum())
subprocess.run(["mount", "-o", f"remount,size={big}", str(root)], check=True)
fill(root / "a.h5")  # the same store, resumed
with h5py.File(root / "a.h5", "r") as f:
    report["resumed_equal"] = f["features"][:].tobytes() == feats.tobytes() and bool(f.attrs["complete"])
with w.StoreWriter.open(root / "b.h5", spec, sync_seconds=0) as writer:  # reserved, then the disk fills up
    with open(root / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"x" * 4096)
        except OSError as exc:
            report["filler"] = exc.strerror
    for b in writer.pending_blocks():
        lo, hi = writer.block_range(b)
        writer.write_block(b, feats[lo:hi], np.zeros(hi - lo, np.uint8))
with h5py.File(root / "b.h5", "r") as f:
    report["reserved_equal"] = f["features"][:].tobytes() == feats.tobytes() and bool(f.attrs["complete"])
print(json.dumps(report))
"""


@pytest.mark.slow
def test_a_full_file_system_is_one_line_and_the_store_resumes(tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        pytest.skip("needs Linux and unshare(1) for a private tmpfs")
    ns = [unshare, "--mount"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--mount"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # 48 KiB: HDF5 can lay the store out, its 32 KiB of features do not all fit
    shell = 'mount -t tmpfs -o size=48k tmpfs "$1" || exit 97; exec "$2" -c "$3" "$1" 1m'
    res = subprocess.run([*ns, "sh", "-c", shell, "sh", str(mnt), sys.executable, ENOSPC_SCRIPT], env=ENV,
                         capture_output=True, text=True, timeout=TIMEOUT)
    if res.returncode == 97 or "unshare failed" in res.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {res.stderr.strip()[:200]}")
    assert res.returncode == 0, res.stderr[-3000:]  # no traceback, no crash of HDF5 on the way out
    assert "Exception ignored" not in res.stderr, res.stderr[-3000:]
    report = json.loads(res.stdout.splitlines()[-1])
    assert re.fullmatch(r"cannot create store \S+a\.h5 \(about [\d.]+ MiB\): No space left on device; .+",
                        report["create"]), report["create"]
    assert report["left"] == [".a.h5.lock"]
    assert re.fullmatch(r"cannot write rows \d+-\d+ of \S+a\.h5: No space left on device; free some space; "
                        r"the rows written before are kept: .+", report["midway"]), report["midway"]
    assert 0 < report["written_before"] < 64
    assert report["resumed_equal"] and report["filler"] == "No space left on device" and report["reserved_equal"]


# --------------------------------------------------------------------------- train-head

HEAD = ["train.epochs=3", "train.lr_step=2", "train.batch_size=64", "cleaner.hidden=16", "train.device=cpu",
        "cleaner.score_repeats=2", "cleaner.knn_k=5", "noise.kind=symmetric", "noise.rate=0.3",
        "train.auto=false"]  # the per-epoch checkpoint of a fixed configuration; the search's below
AUTO = [s for s in HEAD if s != "train.auto=false"] + ["train.cv_folds=3", "train.search_weight_decays=[0.01, 1.0]"]


@pytest.fixture(scope="module")
def head_feats(tmp_path_factory):
    d = tmp_path_factory.mktemp("head-feats")
    write_synthetic_store(d / "train.h5", 4000, 32, 5, seed=1, spread=1.0, split="train")
    write_synthetic_store(d / "test.h5", 300, 32, 5, seed=1, spread=1.0, split="test")
    return d


def head_cmd(feats: Path, out: Path, *extra: str) -> list[str]:
    return mcpipe("train-head", "--no-progress", "--features", str(feats), "--out", str(out), *extra, *sets(*HEAD))


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def epoch_milestones(rng: random.Random) -> list[int]:
    """After which of 3 epochs the three kills come: increasing, the last one after the training."""
    first = rng.randint(1, 2)
    return [first, rng.randint(first + 1, 3), 3]


@pytest.mark.slow
def test_train_head_killed_at_seeded_points_resumes_to_the_uninterrupted_run(head_feats, tmp_path):
    rng = random.Random(SEED + 1)
    ref = Background(head_cmd(head_feats, tmp_path / "ref"), tmp_path)
    out = tmp_path / "run"
    points = []
    for target in epoch_milestones(rng):
        resume = (out / "checkpoint.pt").exists()
        done = checkpoint(out)["epoch"] + 1 if resume else 0  # epochs finished
        epoch = max(target, done + 1)
        # "epoch k/3" follows the checkpoint of epoch k; after the last one the run still scores every
        # image and writes head.pt, metrics.json, scores.csv -- what a run resumed after it only does
        pattern = rf"^epoch {epoch}/3" if epoch <= 3 else r"^resuming"
        delay = rng.uniform(0.0, 0.1)
        kill9_at(head_cmd(head_feats, out, *["--resume"] * resume), tmp_path, pattern=pattern, count=1,
                 delay=delay)
        points.append(f"{pattern[1:]!r} + {delay * 1000:.0f} ms")
    print("train-head kill points:", "; ".join(points))
    res = run(head_cmd(head_feats, out, "--resume"), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ref.wait()
    a, b = tmp_path / "ref", out
    assert no_timings(json.loads((a / "metrics.json").read_text())) == \
        no_timings(json.loads((b / "metrics.json").read_text()))
    ha, hb = (torch.load(p / "head.pt", weights_only=True) for p in (a, b))
    assert ha.keys() == hb.keys() and ha["state_dict"].keys() == hb["state_dict"].keys()
    for k, v in ha["state_dict"].items():
        assert torch.equal(v, hb["state_dict"][k]), k
    assert {k: v for k, v in ha.items() if k != "state_dict"} == {k: v for k, v in hb.items() if k != "state_dict"}
    for name in ("scores.csv", "confusion.csv", "config.toml"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not leftovers(out), leftovers(out)


@pytest.mark.slow
def test_auto_train_head_killed_during_and_after_its_search_resumes_to_the_uninterrupted_run(head_feats, tmp_path):
    """kill -9 in the middle of the search (nothing to keep: it starts again) and after it (the refit starts from
    the search's checkpoint): the resumed run writes what an uninterrupted one writes."""
    rng = random.Random(SEED + 2)
    cmd = lambda out, *extra: mcpipe("train-head", "--no-progress", "--features", str(head_feats),  # noqa: E731
                                     "--out", str(out), *extra, *sets(*AUTO))
    ref = tmp_path / "ref"
    assert run(cmd(ref), tmp_path).returncode == 0
    out = tmp_path / "run"
    for i, pattern in enumerate((r"^round 1: MetaCleaner", r"^chose ")):
        kill9_at(cmd(out, *["--resume"] * (i > 0)), tmp_path, pattern=pattern, count=1, delay=rng.uniform(0, 0.05))
    assert checkpoint(out)["search"] is not None
    res = run(cmd(out, "--resume"), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert no_timings(json.loads((ref / "metrics.json").read_text())) == \
        no_timings(json.loads((out / "metrics.json").read_text()))
    ha, hb = (torch.load(p / "head.pt", weights_only=True)["state_dict"] for p in (ref, out))
    assert all(torch.equal(v, hb[k]) for k, v in ha.items())
    assert (ref / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()


def test_a_run_folder_has_one_writer(head_feats, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    args = ["train-head", "--no-progress", "--features", str(head_feats), "--out", str(out), *sets(*HEAD)]
    with acquire(out / ".lock", what="the test's run folder", writer="test"):  # as another process would
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1, res.output
        assert f"run folder {out} is being written by another process (mcpipe train-head, finetune or sweep, " \
               f"pid {os.getpid()})" in res.output
        assert "Traceback" not in res.output and not (out / "config.toml").exists()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output


def test_run_folder_writes_that_fail_are_one_line(tmp_path):
    save_atomic({"w": torch.zeros(10)}, tmp_path / "checkpoint.pt")
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old[1]))
    try:
        with pytest.raises(DataError, match=r"^cannot write \S+checkpoint\.pt: File too large; .*kept$"):
            save_atomic({"w": torch.zeros(100_000)}, tmp_path / "checkpoint.pt")
        with pytest.raises(DataError, match=r"^cannot write \S+metrics\.json: File too large"):
            write_json_atomic({"x": "y" * 10_000}, tmp_path / "metrics.json")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["w"].shape == (10,)  # the old one intact


# --------------------------------------------------------------------------- finetune


def finetune_cmd(work: Path, out: Path, *extra: str) -> list[str]:
    return mcpipe("finetune", "--no-progress", "--out", str(out), *extra, *sets(
        "data.source=imagefolder", f"data.root={work / 'small'}", "extract.backbone=resnet18", "extract.weights=none",
        "extract.image_size=32", "finetune.batch_size=12", "finetune.workers=0", "finetune.device=cpu",
        "cleaner.subset_size=2", "cleaner.hidden=16", "cleaner.weighting=fc_fc_relu_sig", "finetune.epochs=2",
        "finetune.unload_epochs=1"))


@pytest.mark.slow
def test_finetune_killed_at_seeded_points_resumes_to_the_uninterrupted_run(work, tmp_path):
    rng = random.Random(SEED + 2)
    ref = Background(finetune_cmd(work, tmp_path / "ref"), work)
    out = tmp_path / "run"
    points = []
    for target in epoch_milestones(rng):
        resume = (out / "checkpoint.pt").exists()
        done = checkpoint(out)["epoch"] if resume else 0  # epochs finished
        epoch = max(target, done + 1)
        # "epoch k/3" follows the checkpoint of epoch k (epochs 1-2 cleaner, 3 unload); after the last one
        # the run exports model.pt -- what a run resumed after it only does, after the backbone's warning
        pattern = rf"^epoch {epoch}/3" if epoch <= 3 else "random initialisation"
        delay = rng.uniform(0.0, 0.05 if epoch == 3 else 0.2)
        kill9_at(finetune_cmd(work, out, *["--resume"] * resume), work, pattern=pattern, count=1, delay=delay)
        points.append(f"{pattern.lstrip('^')!r} + {delay * 1000:.0f} ms")
    print("finetune kill points:", "; ".join(points))
    res = run(finetune_cmd(work, out, *["--resume"] * (out / "checkpoint.pt").exists()), work)
    assert res.returncode == 0, res.stderr[-3000:]
    ref.wait()
    a, b = tmp_path / "ref", out
    for name in ("metrics.json", "model.json"):
        assert no_timings(json.loads((a / name).read_text())) == no_timings(json.loads((b / name).read_text())), name
    wa, wb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (a / "confusion.csv").read_bytes() == (b / "confusion.csv").read_bytes()
    assert not leftovers(out), leftovers(out)
