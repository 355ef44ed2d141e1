"""mcpipe finetune: a training step on tiny images, phases, --head and its refusals, resume inside an epoch,
sampling, and model selection on validation (a val split or a stratified hold-out), never on the test split.
Two gloo processes (DDP): tests/test_preemption_finetune.py, whose uninterrupted torchrun run is checked as
this file's was."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fixtures_data import make_noisy_colour_images
from mcpipe.cleaner.sampler import SubsetSampler
from mcpipe.cli import app
from mcpipe.extract.preprocess import preprocess_for, train_transform
from mcpipe.extract.sources.registry import load_index
from mcpipe.config import load_config
from mcpipe.errors import ConfigError
from mcpipe.distributed import DistInfo
from mcpipe.extract.sources.registry import available_splits
from mcpipe.cleaner.split import stratified_holdout
from mcpipe.finetune.data import ShuffledBatches, SubsetBatches, TrainImages
from mcpipe.finetune.export import load_model
from mcpipe.finetune.loop import select
from mcpipe.records import FinetuneEpoch, FinetuneMetrics
from mcpipe.finetune.run import _validation

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_noisy_colour_images(tmp_path_factory.mktemp("ft") / "data", {"train": 8, "val": 4, "test": 3})


def settings(root: Path, *extra: str) -> list[str]:
    keys = ["data.source=imagefolder", f"data.root={root}", "extract.backbone=resnet18", "extract.weights=none",
            "extract.image_size=32", "finetune.batch_size=12", "finetune.epochs=1", "finetune.workers=0",
            "finetune.device=cpu", "cleaner.subset_size=2", "cleaner.hidden=16", "cleaner.weighting=fc_fc_relu_sig",
            *extra]
    return [a for k in keys for a in ("--set", k)]


def finetune(root: Path, out: Path, *extra: str, args: tuple[str, ...] = ()):
    return runner.invoke(app, ["finetune", "--no-progress", "--log-level", "warning", "--out", str(out),
                               *args, *settings(root, *extra)])


@pytest.mark.slow
def test_one_epoch_trains_evaluates_and_exports(data, tmp_path):
    res = finetune(data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["phase"] for h in m["history"]] == ["cleaner"]
    row = m["history"][0]
    assert row["loss"] > 0 and row["images_per_second"] > 0 and row["test_images"] == 9
    assert 0 <= m["test_accuracy"] <= 1 and "test_top5" not in m  # 3 classes: no top-5
    # the data has a val split: it is the validation set, whole training split trained on, chosen on val
    assert m["val_from"] == "val" and m["val_images"] == 12 and m["train_images"] == 24
    assert row["val_images"] == row["val_clean_images"] == 12 and row["val_clean_top1"] == row["val_top1"]
    assert m["chosen_on"] == "val" and m["best_epoch"] == 1 and m["best_val_accuracy"] == row["val_top1"]
    assert m["test_accuracy_at_best_epoch"] == row["test_top1"] and "best_test_accuracy" not in m
    net, meta = load_model(tmp_path / "run")
    assert meta["classes"] == ["c0", "c1", "c2"] and meta["backbone"] == "resnet18" and meta["image_size"] == 32
    assert meta["preprocessing"]["image_size"] == 32 and meta["provenance"]["random_init"] is True
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved.items())
    from mcpipe.extract.backbones import build_backbone

    fresh = build_backbone("resnet18", "none", image_size=32).state_dict()  # trained: moved from the initialisation
    assert any(not torch.equal(net.backbone.state_dict()[k], v) for k, v in fresh.items() if v.is_floating_point())
    assert "test top-1" in res.output


@pytest.mark.slow
def test_unload_and_clean_phases_run_in_order(data, tmp_path):
    res = finetune(data, tmp_path / "run", "finetune.unload_epochs=1", "finetune.clean_split=val",
                   "finetune.clean_epochs=1", "finetune.freeze_epochs=1", "finetune.val_split=")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["phase"] for h in m["history"]] == ["cleaner", "unload", "clean"]
    assert [h["backbone_trained"] for h in m["history"]] == [False, True, True]
    assert [p["split"] for p in m["phases"]] == ["train", "train", "val"]


def test_frozen_backbone_keeps_its_weights(data, tmp_path):
    res = finetune(data, tmp_path / "run", "finetune.freeze_epochs=1")
    assert res.exit_code == 0, res.output
    net, _ = load_model(tmp_path / "run")
    from mcpipe.extract.backbones import build_backbone

    fresh = build_backbone("resnet18", "none", image_size=32)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(net.backbone.state_dict()[k], v, rtol=0, atol=0, msg=k)


def _head_run(data: Path, tmp: Path, *extra: str) -> Path:
    feats, head = tmp / "features", tmp / "head"
    common = settings(data, *extra)
    assert runner.invoke(app, ["extract", "--no-progress", "--log-level", "warning", "--out", str(feats),
                               *common]).exit_code == 0
    res = runner.invoke(app, ["train-head", "--no-progress", "--log-level", "warning", "--features", str(feats),
                              "--out", str(head), *common, "--set", "train.epochs=2", "--set", "train.batch_size=12"])
    assert res.exit_code == 0, res.output
    return head


@pytest.mark.slow
def test_head_initialisation_and_its_refusals(data, tmp_path):
    head = _head_run(data, tmp_path)
    from mcpipe.finetune.run import _load_head

    cfg = load_config(None, [s for s in settings(data) if s != "--set"])
    loaded = _load_head(head, cfg, 512, ["c0", "c1", "c2"])
    saved = torch.load(head / "head.pt", weights_only=True)
    for k, v in saved["state_dict"].items():
        assert torch.equal(loaded.state_dict()[k], v)
    res = finetune(data, tmp_path / "run", "finetune.epochs=2", args=("--head", str(head)))
    assert res.exit_code == 0, res.output
    # epoch 0, the head on the pretrained backbone before any step, is evaluated and is a candidate
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = [m["start"], *m["history"]]
    assert m["start"]["epoch"] == 0 and m["start"]["val_images"] == 12 and "test_top1" in m["start"]
    best = max(rows, key=lambda h: h["val_top1"])
    assert (m["best_epoch"], m["exported_epoch"], m["test_accuracy"]) == (best["epoch"],) * 2 + (best["test_top1"],)
    # model.pt holds the chosen epoch's weights: its test top-1, recomputed, is the one recorded for that epoch
    from mcpipe.finetune.train import evaluate

    net, meta = load_model(tmp_path / "run")
    test = load_index(load_config(None, [s for s in settings(data) if s != "--set"]).data, "test")
    from mcpipe.extract.preprocess import Preprocess

    again = evaluate(net, test, Preprocess.from_dict(meta["preprocessing"]), device=torch.device("cpu"), amp=False,
                     batch_size=12, workers=0)[0]
    assert again["test_top1"] == best["test_top1"] == meta["metrics"]["test_accuracy"]

    # another backbone, another class list, files that are not heads
    res = finetune(data, tmp_path / "r2", "extract.backbone=resnet34", args=("--head", str(head)))
    assert res.exit_code == 1 and "backbone is resnet18 but this finetune's is resnet34" in res.output
    bad = dict(saved, classes=["a", "b"])
    torch.save(bad, tmp_path / "two.pt")
    res = finetune(data, tmp_path / "r3", args=("--head", str(tmp_path / "two.pt")))
    assert res.exit_code == 1 and "class count is 2 but this finetune's is 3" in res.output
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    res = finetune(data, tmp_path / "r4", args=("--head", str(tmp_path / "junk.pt")))
    assert res.exit_code == 1 and "cannot be read as an mcpipe head" in res.output
    torch.save({"format": "mcpipe-head", "obj": Path("x")}, tmp_path / "pickled.pt")
    res = finetune(data, tmp_path / "r5", args=("--head", str(tmp_path / "pickled.pt")))
    assert res.exit_code == 1 and "cannot be read as an mcpipe head" in res.output
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r5").exists()  # refused before writing


def test_refusals_before_any_work(data, tmp_path):
    res = finetune(data, tmp_path / "r", "finetune.clean_split=nope", "finetune.clean_epochs=1")
    assert res.exit_code == 2 and "finetune.clean_split = 'nope' is not a split" in res.output
    res = finetune(data, tmp_path / "r", "finetune.clean_epochs=1")
    assert res.exit_code == 2 and "finetune.clean_split" in res.output
    res = finetune(data, tmp_path / "r", "finetune.clean_split=val", "finetune.clean_epochs=1")
    assert res.exit_code == 2 and "finetune.val_split = 'val' is invalid" in res.output  # would be trained on
    res = finetune(data, tmp_path / "r", "finetune.val_split=test")
    assert res.exit_code == 2 and "other than finetune.test_split" in res.output  # choosing on test
    res = finetune(data, tmp_path / "r", "finetune.val_split=", "finetune.val_fraction=1")
    assert res.exit_code == 2 and "finetune.val_fraction = 1" in res.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.json").write_text("{}")
    res = finetune(data, tmp_path / "taken")
    assert res.exit_code == 1 and "already holds a run" in res.output
    assert (tmp_path / "taken" / "metrics.json").read_text() == "{}"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcpipe", *args]


SEED = int(os.environ.get("MCPIPE_FAULT_SEED", "14"))  # the kill points below; MCPIPE_FAULT_SEED=<seed> replays


def _killed(cmd: list[str], tmp: Path, point: str, count: int, delay: float, pause: float) -> None:
    """``kill -9`` of ``cmd`` ``delay`` s after its ``count``-th pause at ``point`` (``mcpipe.faults``)."""
    from test_preemption_extract import Proc

    proc = Proc(cmd, tmp / f"logs-{point}", pause_at=point, pause=pause)
    assert proc.read_until(f"test pause at {point}", count), proc.wait()[2][-3000:]
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_9_inside_an_epoch_and_resume_equals_an_uninterrupted_run(data, tmp_path):
    """``kill -9`` after a seeded step inside epoch 1 (checkpoint_minutes tiny: a checkpoint after every step),
    then, resumed from there, during that epoch's evaluation or export (its last checkpoint: step 6 of 6, the
    evaluation not yet done); resumed again, the run equals an uninterrupted one (checkpoint_minutes = 0):
    history and metrics (timings aside), model.pt tensors bit for bit, confusion.csv."""
    rng = random.Random(SEED)
    replay = f"seed {SEED} (MCPIPE_FAULT_SEED={SEED} replays it)"
    extra = ("finetune.epochs=2", "finetune.unload_epochs=1", "finetune.batch_size=4")  # 6 steps an epoch
    base = _cli("finetune", "--no-progress", "--log-level", "warning", *settings(data, *extra))
    whole = subprocess.Popen(base + ["--out", str(tmp_path / "whole"), "--set", "finetune.checkpoint_minutes=0"],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # alongside the others
    out = tmp_path / "cut"
    args = base + ["--out", str(out), "--set", "finetune.checkpoint_minutes=1e-9"]
    step = rng.randint(2, 5)
    _killed(args, tmp_path, "finetune_step", step, rng.uniform(0.0, 0.2), pause=0.3)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, step - 1), replay  # step's own checkpoint follows its pause
    point, delay = rng.choice(["finetune_evaluate", "finetune_export"]), rng.uniform(0.0, 0.4)
    _killed(args + ["--resume"], tmp_path, point, 1, delay, pause=0.2)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    tried = f"{replay}: kill -9 at step {step} + {point} + {delay * 1000:.0f} ms -> epoch {ckpt['epoch']}, " \
            f"step {ckpt['step']}"
    assert (ckpt["epoch"], ckpt["step"]) >= (0, 6) and ckpt["epoch"] <= 1, tried  # or killed after epoch 1's end
    res = subprocess.run(args + ["--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (tried, res.stderr[-2000:])
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-2000:]
    whole.stderr.close()
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (tmp_path / "whole", out))
    assert _timeless(a) == _timeless(b), tried
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (tmp_path / "whole", out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), tried
    assert (tmp_path / "whole" / "confusion.csv").read_bytes() == (out / "confusion.csv").read_bytes(), tried
    assert not list(out.glob(".*.tmp-*")), tried  # the killed writes' temporaries were cleared
    print(tried)
    res = finetune(data, out, *extra, "finetune.checkpoint_minutes=2", args=("--resume",))
    assert res.exit_code == 2 and "config differs" in res.output


def _timeless(m: dict) -> dict:
    """metrics.json without its timings (wall seconds, images per second)."""
    return json.loads(json.dumps(m), object_hook=lambda d: {k: v for k, v in d.items()
                                                            if k not in ("seconds", "images_per_second")})


def test_ranks_draw_disjoint_batches_that_cover_a_single_process_epoch():
    labels = np.repeat(np.arange(5), 9)
    sampler = SubsetSampler(labels, subset_size=3, batch_size=6, seed=0)
    single = list(SubsetBatches(sampler, 2))
    ranks = [list(SubsetBatches(sampler, 2, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) // 2
    merged = [b for pair in zip(*ranks) for b in pair]
    assert merged == single[:len(merged)]
    plain = [list(ShuffledBatches(45, 6, 1, seed=0, rank=r, world=2)) for r in range(2)]
    rows = [k[2] for batches in plain for b in batches for k in b]
    assert len(rows) == len(set(rows)) == 2 * 3 * 6


def test_augmentation_depends_on_the_key_only(data):
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={data}"])
    index = load_index(cfg.data, "train")
    ds = TrainImages(index, index.labels, train_transform(preprocess_for("resnet18", 32)), seed=0, min_size=37)
    a = ds[(1, 5, 3)][0]
    ds[(0, 0, 7)]
    assert torch.equal(ds[(1, 5, 3)][0], a)
    assert not torch.equal(ds[(2, 5, 3)][0], a)


def test_an_unreadable_image_is_replaced_by_one_of_its_class(tmp_path):
    root = make_noisy_colour_images(tmp_path / "d", {"train": 3})
    (root / "train" / "c1" / "0.png").write_bytes(b"")
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}"])
    index = load_index(cfg.data, "train")
    ds = TrainImages(index, index.labels, train_transform(preprocess_for("resnet18", 32)), seed=0, min_size=37)
    row = index.ids.index("c1/0.png")
    _, asked, read = ds[(0, 0, row)]
    assert asked == row and read != row and index.labels[read] == index.labels[row]


@pytest.mark.slow
def test_runs_with_random_layers_repeat_exactly(data, tmp_path):
    """EfficientNet-Lite0 drops connections at random while training: two identical runs must still agree."""
    pytest.importorskip("efficientnet_lite_pytorch")
    extra = ("extract.backbone=efficientnet_lite0", "finetune.freeze_bn=false", "finetune.workers=2")
    for name in ("a", "b"):
        res = finetune(data, tmp_path / name, *extra)
        assert res.exit_code == 0, res.output
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- model selection on validation


def test_holdout_is_stratified_seeded_and_keeps_small_classes_in_training():
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(5), [40, 20, 1, 2, 5]))
    held = stratified_holdout(labels, 0.1, seed=0)
    assert held.dtype == np.int64 and np.all(np.diff(held) > 0)
    assert np.bincount(labels[held], minlength=5).tolist() == [4, 2, 0, 1, 1]  # 1 of a single image: kept
    assert np.array_equal(held, stratified_holdout(labels, 0.1, seed=0))
    assert not np.array_equal(held, stratified_holdout(labels, 0.1, seed=1))
    # a class's rows depend on that class only: adding images of another class leaves them alone
    more = np.concatenate([labels, np.full(30, 4)])
    held_more = stratified_holdout(more, 0.1, seed=0)
    assert np.array_equal(held_more[more[held_more] != 4], held[labels[held] != 4])
    assert len(stratified_holdout(labels, 0.0, seed=0)) == 0
    with pytest.raises(ValueError, match="fraction = 1"):
        stratified_holdout(labels, 1, seed=0)


def _config(root: Path, *extra: str):
    return load_config(None, [s for s in settings(root, *extra) if s != "--set"])


def test_validation_holds_out_given_labels_disjoint_from_training(data):
    cfg = _config(data, "finetune.val_split=", "finetune.val_fraction=0.25", "noise.kind=symmetric",
                  "noise.rate=0.5")
    full = load_index(cfg.data, "train")
    given = (full.labels + 1) % 3  # stands for the noisy labels
    train, train_given, val = _validation(cfg, available_splits(cfg.data), full, given, DistInfo())
    assert set(train.ids).isdisjoint(val.ids) and sorted(train.ids + val.ids) == sorted(full.ids)
    assert len(val) == 6 and np.bincount(val.labels, minlength=3).tolist() == [2, 2, 2]  # 8 x 0.25 per class
    rows = [full.ids.index(i) for i in val.ids]
    assert np.array_equal(val.labels, given[rows])  # selected on the given labels
    assert np.array_equal(val.clean_labels, full.labels[rows])  # synthetic noise: the originals are the truth
    assert np.array_equal(train_given, given[[full.ids.index(i) for i in train.ids]])
    again = _validation(cfg, available_splits(cfg.data), full, given, DistInfo())[2]
    assert again.ids == val.ids  # every rank, every --resume
    named = _validation(_config(data), available_splits(cfg.data), full, given, DistInfo())
    assert named[0] is full and named[2].split == "val"  # a val split: nothing held out of training


@pytest.mark.slow
def test_held_out_images_are_never_trained_on(data, tmp_path, monkeypatch):
    import mcpipe.finetune.loop as ft

    read: set[str] = set()

    class Recording(TrainImages):
        def __getitem__(self, key):
            image, row, candidate = super().__getitem__(key)
            read.add(self.index.ids[candidate])
            return image, row, candidate

    monkeypatch.setattr(ft, "TrainImages", Recording)
    res = finetune(data, tmp_path / "run", "finetune.val_split=", "finetune.unload_epochs=1")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["val_from"] == "train hold-out" and m["val_images"] == 3 and m["train_images"] == 21
    assert m["chosen_on"] == "val" and all(h["val_images"] == 3 for h in m["history"])
    cfg = _config(data, "finetune.val_split=", "finetune.unload_epochs=1")
    full = load_index(cfg.data, "train")
    val = _validation(cfg, available_splits(cfg.data), full, full.labels.copy(), DistInfo())[2]
    assert read and read.isdisjoint(val.ids)


def test_best_epoch_is_chosen_on_validation_not_test():
    history = [{"epoch": 1, "val_top1": 0.5, "test_top1": 0.2}, {"epoch": 2, "val_top1": 0.9, "test_top1": 0.3},
               {"epoch": 3, "val_top1": 0.9, "test_top1": 0.95}, {"epoch": 4, "val_top1": 0.1, "test_top1": 0.4}]

    def chosen(rows: list[dict], export: str = "best", start: dict | None = None) -> dict:
        m = FinetuneMetrics(history=[FinetuneEpoch.from_dict(r) for r in rows],
                            start=None if start is None else FinetuneEpoch.from_dict(start))
        return select(m, export=export).to_dict()

    m = chosen(history)
    assert (m["best_epoch"], m["best_val_accuracy"], m["test_accuracy_at_best_epoch"]) == (2, 0.9, 0.3)  # tie: 2
    # export = best: model.pt is epoch 2's, and test_accuracy its test top-1; the last epoch's is reported apart
    assert (m["exported_epoch"], m["test_accuracy"], m["test_accuracy_last_epoch"]) == (2, 0.3, 0.4)
    assert "best_test_accuracy" not in m
    last = chosen(history, "last")
    assert (last["best_epoch"], last["exported_epoch"], last["test_accuracy"]) == (2, 4, 0.4)
    # with --head, epoch 0 (the head on the pretrained backbone) is a candidate; ties keep the earlier
    start = {"epoch": 0, "phase": "start", "val_top1": 0.9, "test_top1": 0.25}
    m0 = chosen(history, start=start)
    assert (m0["best_epoch"], m0["exported_epoch"], m0["test_accuracy"], m0["start"]) == (0, 0, 0.25, start)
    none = chosen([{k: v for k, v in h.items() if k != "val_top1"} for h in history])
    assert "best_epoch" not in none and none["test_accuracy"] == 0.4 and none["exported_epoch"] == 4


@pytest.mark.slow
def test_test_labels_do_not_change_what_is_chosen(data, tmp_path):
    """Poisoned test labels (every test image moved to the next class) change the test numbers only."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(data, poisoned)
    shutil.rmtree(poisoned / "test")
    for k in range(3):
        shutil.copytree(data / "test" / f"c{k}", poisoned / "test" / f"c{(k + 1) % 3}")
    runs = []
    for root, name in ((data, "clean"), (poisoned, "poisoned")):
        res = finetune(root, tmp_path / name, "finetune.epochs=3", "finetune.val_split=", "noise.kind=symmetric",
                       "noise.rate=0.3")
        assert res.exit_code == 0, res.output
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    a, b = runs
    assert [h["test_top1"] for h in a["history"]] != [h["test_top1"] for h in b["history"]]
    val = lambda m: [{k: v for k, v in h.items() if k.startswith("val_")} for h in m["history"]]  # noqa: E731
    assert val(a) == val(b) and len(val(a)[0]) == 4  # with synthetic noise the hold-out's true labels are known
    for key in ("best_epoch", "best_val_accuracy", "chosen_on", "val_images", "val_from"):
        assert a[key] == b[key], key
    best = a["best_epoch"]
    assert b["test_accuracy_at_best_epoch"] == b["history"][best - 1]["test_top1"]


def test_no_validation_chooses_nothing(data, tmp_path):
    res = finetune(data, tmp_path / "run", "finetune.val_split=", "finetune.val_fraction=0")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["chosen_on"] == "none" and m["val_images"] == 0 and m["train_images"] == 24
    assert "best_epoch" not in m and "test_accuracy_at_best_epoch" not in m and "val_top1" not in m["history"][0]
    assert "test_accuracy" in m


def test_config_refuses_validation_on_trained_or_test_splits():
    with pytest.raises(ConfigError, match="other than finetune.train_split"):
        load_config(None, ["finetune.val_split=train"])
    with pytest.raises(ConfigError, match=r"finetune.val_fraction = -0.1 is invalid"):
        load_config(None, ["finetune.val_fraction=-0.1"])
    assert load_config(None, ["finetune.val_split=", "finetune.test_split="]).finetune.val_split == ""


def test_training_curves_mark_the_best_epoch_by_validation_and_still_draw_old_runs(tmp_path):
    from mcpipe.records import FinetuneEpoch, HeadEpoch
    from mcpipe.report.figures import training_curves

    new = [{"epoch": e, "phase": "cleaner", "loss": 1.0 / e, "val_top1": v, "val_clean_top1": v, "test_top1": t}
           for e, v, t in ((1, 0.5, 0.9), (2, 0.7, 0.4))]
    old = [{"epoch": e, "phase": "cleaner", "loss": 1.0 / e, "test_top1": 0.3 * e} for e in (1, 2)]  # no val keys
    for name, history in (("new", [FinetuneEpoch.from_dict(r) for r in new]),
                          ("old", [FinetuneEpoch.from_dict(r) for r in old]), ("untested", [HeadEpoch(1, 1.0)])):
        png = training_curves(history, tmp_path / f"{name}.png")
        assert png.stat().st_size > 5000


def test_lr_schedules_warm_up_then_decay_per_step():
    from mcpipe.finetune.schedule import lr_factor

    kw = dict(steps_per_epoch=10, epochs=3, warmup_epochs=0.5, lr_step=1, lr_gamma=0.1)
    cos = [lr_factor(s, schedule="cosine", **kw) for s in range(30)]
    assert cos[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6]) and cos[5] == 1.0  # linear warm-up
    assert all(a > b for a, b in zip(cos[5:], cos[6:])) and 0 < cos[-1] < 0.01  # down to ~0 at the last step
    step = [lr_factor(s, schedule="step", **kw) for s in range(30)]
    assert step[5:10] == [1.0] * 5 and step[10:20] == [pytest.approx(0.1)] * 10 and step[29] == pytest.approx(0.01)
    assert lr_factor(0, schedule="cosine", steps_per_epoch=4, epochs=1, warmup_epochs=0, lr_step=1,
                     lr_gamma=0.1) == 1.0  # no warm-up: the full rate at once
