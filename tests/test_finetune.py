"""mcpipe finetune: a training step on tiny images, phases, --head and its refusals, resume, DDP, sampling."""

from __future__ import annotations

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
from typer.testing import CliRunner

from fixtures_data import make_noisy_colour_images
from mcpipe.cleaner.sampler import SubsetSampler
from mcpipe.cli import app
from mcpipe.extract.preprocess import preprocess_for, train_transform
from mcpipe.extract.sources.registry import load_index
from mcpipe.config import load_config
from mcpipe.finetune.data import ShuffledBatches, SubsetBatches, TrainImages
from mcpipe.finetune.export import load_model

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


def test_one_epoch_trains_evaluates_and_exports(data, tmp_path):
    res = finetune(data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["phase"] for h in m["history"]] == ["cleaner"]
    row = m["history"][0]
    assert row["loss"] > 0 and row["images_per_second"] > 0 and row["test_images"] == 9
    assert 0 <= m["test_accuracy"] <= 1 and "test_top5" not in m  # 3 classes: no top-5
    net, meta = load_model(tmp_path / "run")
    assert meta["classes"] == ["c0", "c1", "c2"] and meta["backbone"] == "resnet18" and meta["image_size"] == 32
    assert meta["preprocessing"]["image_size"] == 32 and meta["provenance"]["random_init"] is True
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved.items())
    from mcpipe.extract.backbones import build_backbone

    fresh = build_backbone("resnet18", "none", image_size=32).state_dict()  # trained: moved from the initialisation
    assert any(not torch.equal(net.backbone.state_dict()[k], v) for k, v in fresh.items() if v.is_floating_point())
    assert "test top-1" in res.output


def test_unload_and_clean_phases_run_in_order(data, tmp_path):
    res = finetune(data, tmp_path / "run", "finetune.unload_epochs=1", "finetune.clean_split=val",
                   "finetune.clean_epochs=1", "finetune.freeze_epochs=1")
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


def test_head_initialisation_and_its_refusals(data, tmp_path):
    head = _head_run(data, tmp_path)
    from mcpipe.finetune.run import _load_head

    cfg = load_config(None, [s for s in settings(data) if s != "--set"])
    loaded = _load_head(head, cfg, 512, ["c0", "c1", "c2"])
    saved = torch.load(head / "head.pt", weights_only=True)
    for k, v in saved["state_dict"].items():
        assert torch.equal(loaded.state_dict()[k], v)
    res = finetune(data, tmp_path / "run", args=("--head", str(head)))
    assert res.exit_code == 0, res.output

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
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.json").write_text("{}")
    res = finetune(data, tmp_path / "taken")
    assert res.exit_code == 1 and "already holds a run" in res.output
    assert (tmp_path / "taken" / "metrics.json").read_text() == "{}"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcpipe", *args]


def test_kill_and_resume_equals_an_uninterrupted_run(data, tmp_path):
    extra = ("finetune.epochs=2", "finetune.unload_epochs=1")
    base = _cli("finetune", "--no-progress", "--log-level", "warning", *settings(data, *extra))
    subprocess.run(base + ["--out", str(tmp_path / "whole")], env=ENV, check=True, capture_output=True, timeout=300)
    out = tmp_path / "cut"
    args = base + ["--out", str(out)]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] < 3, "the run finished before it could be killed"
    res = subprocess.run(args + ["--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    strip = lambda h: [{k: v for k, v in r.items() if k != "images_per_second"} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    wa = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    wb = torch.load(out / "model.pt", weights_only=True)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    res = finetune(data, out, "finetune.epochs=3", args=("--resume",))
    assert res.exit_code == 2 and "config differs" in res.output


def test_two_gloo_processes(data, tmp_path):
    out = tmp_path / "ddp"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mcpipe", "finetune", "--no-progress", "--log-level", "warning", "--out", str(out),
                          *settings(data, "finetune.unload_epochs=1", "finetune.batch_size=6")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert [h["phase"] for h in m["history"]] == ["cleaner", "unload"]
    assert m["history"][0]["test_images"] == 9  # the two test shards add up to the whole split
    net, _ = load_model(out)
    assert res.stdout.count("test top-1") == 1  # only rank 0 reports


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
