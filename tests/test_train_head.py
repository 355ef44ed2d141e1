"""mcpipe train-head and sweep on small synthetic stores: outputs, determinism, planted noise, refusals (kill -9 and
resume: tests/test_interrupt.py, tests/test_preemption_head.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch

from conftest import invoke, sets
from mcpipe.store.synthetic import write_synthetic_store

FAST = ["train.epochs=3", "train.lr_step=2", "train.batch_size=64", "cleaner.hidden=16", "train.device=cpu",
        "cleaner.score_repeats=2", "cleaner.knn_k=5"]
FIXED = ["train.auto=false"]  # exactly the config given (the automatic search has its own tests)


def fast(*items: str, fixed: bool = True) -> list[str]:
    return sets(*FAST, *(FIXED if fixed else ()), *items)


def test_train_head_writes_a_complete_run(feats, tmp_path):
    out = tmp_path / "run"
    res = invoke("train-head", "--features", str(feats), "--out", str(out),
                 *fast("noise.kind=symmetric", "noise.rate=0.3"))
    assert res.exit_code == 0, res.output
    assert "MetaCleaner N = 4" in res.output and "test accuracy" in res.output
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["test_accuracy"] <= 1 and m["seconds"] > 0 and len(m["history"]) == 3
    assert abs(m["noise"]["realized_rate"] - 0.3) < 1e-9
    assert set(m["detection"]) == {"alpha", "classifier", "knn"}
    assert m["noise_detection_auroc"] == m["detection"]["classifier"]["auroc"]
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 600 and rows[0]["rank"] == "1"
    scores = [float(r["classifier_score"]) for r in rows]
    assert scores == sorted(scores)  # most suspect first
    head = torch.load(out / "head.pt", weights_only=True)
    assert head["format"] == "mcpipe-head" and head["classes"] == [f"class{c}" for c in range(5)]
    assert head["head"]["subset_size"] == 4 and head["feature_dim"] == 24
    assert "[cleaner]" in (out / "config.toml").read_text()


def test_same_config_same_numbers(feats, tmp_path):
    args = fast("noise.kind=symmetric", "noise.rate=0.2")
    for name in ("a", "b"):
        assert invoke("train-head", "--features", str(feats), "--out", str(tmp_path / name), *args).exit_code == 0
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    strip = lambda h: [{k: v for k, v in e.items() if k != "images_per_second"} for e in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"]) and a["test_accuracy"] == b["test_accuracy"]
    assert a["detection"] == b["detection"]


def test_the_knn_graph_is_built_only_when_something_reads_it(tmp_path):
    """knn_score off, random mining, ranking by the classifier: no FAISS graph, the same model and the same
    scores but an empty knn_score column; ranking by it builds the graph (and caches it) after all."""
    feats = tmp_path / "feats"
    write_synthetic_store(feats / "train.h5", 300, 16, 3, seed=4, spread=1.0, split="train")
    cache = lambda: sorted(p.name for p in feats.glob("*.knn-*"))  # noqa: E731
    args = fast("noise.kind=symmetric", "noise.rate=0.2")
    assert invoke("train-head", "--features", str(feats), "--out", str(tmp_path / "without"), *args,
                  "--set", "cleaner.knn_score=false").exit_code == 0
    assert cache() == []
    rows = list(csv.DictReader(open(tmp_path / "without" / "scores.csv")))
    assert {r["knn_score"] for r in rows} == {""}
    m = json.loads((tmp_path / "without" / "metrics.json").read_text())
    assert set(m["detection"]) == {"alpha", "classifier"}
    assert invoke("train-head", "--features", str(feats), "--out", str(tmp_path / "with"), *args).exit_code == 0
    assert cache() == ["train.knn-k5.npz"]
    full = list(csv.DictReader(open(tmp_path / "with" / "scores.csv")))
    drop = lambda rs: [{k: v for k, v in r.items() if k != "knn_score"} for r in rs]  # noqa: E731
    assert drop(rows) == drop(full) and all(r["knn_score"] for r in full)
    (feats / "train.knn-k5.npz").unlink()
    assert invoke("train-head", "--features", str(feats), "--out", str(tmp_path / "ranked"), *args,
                  "--set", "cleaner.knn_score=false", "--set", "train.rank_by=knn").exit_code == 0
    assert cache() == ["train.knn-k5.npz"]


def test_planted_noise_is_ranked_first(feats, tmp_path):
    out = tmp_path / "run"
    res = invoke("train-head", "--features", str(feats), "--out", str(out),
                 *fast("noise.kind=symmetric", "noise.rate=0.3", "train.epochs=6"))
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["noise_detection_auroc"] > 0.85
    assert m["detection"]["knn"]["auroc"] > 0.85


def test_refusals(feats, tmp_path):
    out = tmp_path / "run"
    res = invoke("train-head", "--features", str(feats), "--out", str(out), *fast("cleaner.subset_size=500"))
    assert res.exit_code == 2 and "500" in res.output and "Traceback" not in res.output
    res = invoke("train-head", "--features", str(feats), "--out", str(out), *fast("cleaner.weighting=magic"))
    assert res.exit_code == 2 and "cleaner.weighting" in res.output and "relation" in res.output
    bad = tmp_path / "bad"
    bad.mkdir()
    write_synthetic_store(bad / "train.h5", 50, 8, 3, split="train")
    write_synthetic_store(bad / "test.h5", 50, 12, 3, split="test")
    res = invoke("train-head", "--features", str(bad), "--out", str(out), *fast())
    assert res.exit_code == 1 and "feature dimension" in res.output
    res = invoke("train-head", "--features", str(tmp_path / "none"), "--out", str(out), *fast())
    assert res.exit_code == 1 and "not a folder" in res.output
    # a finished run is not overwritten without --overwrite
    assert invoke("train-head", "--features", str(feats), "--out", str(out), *fast()).exit_code == 0
    before = (out / "metrics.json").read_bytes()
    res = invoke("train-head", "--features", str(feats), "--out", str(out), *fast())
    assert res.exit_code == 1 and "already holds a run" in res.output
    res = invoke("train-head", "--features", str(feats), "--out", str(out), "--resume", *fast("train.lr=0.5"))
    assert res.exit_code == 2 and "config differs" in res.output
    assert (out / "metrics.json").read_bytes() == before


def test_a_truncated_or_other_version_checkpoint_is_refused_with_one_line(feats, tmp_path):
    out = tmp_path / "run"
    assert invoke("train-head", "--features", str(feats), "--out", str(out), *fast()).exit_code == 0
    (out / "metrics.json").unlink()  # as if killed after the last epoch's checkpoint
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["format"], ckpt["version"]) == ("mcpipe-head-checkpoint", 1)
    torch.save({**ckpt, "version": 2}, out / "checkpoint.pt")
    res = invoke("train-head", "--features", str(feats), "--out", str(out), "--resume", *fast())
    assert res.exit_code == 1 and "is a version-2 train-head checkpoint; this mcpipe reads version 1" in res.output
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:300])
    res = invoke("train-head", "--features", str(feats), "--out", str(out), "--resume", *fast())
    assert res.exit_code == 1 and "checkpoint.pt cannot be read" in res.output
    assert [line for line in res.output.splitlines() if line.startswith("error:")] == \
        [f"error: --resume: {out / 'checkpoint.pt'} cannot be read: not a complete torch file (reading zip "
         "archive: failed finding central directory): truncated, or not written by torch.save"], res.output


def test_sweep_runs_the_grid_once_loaded(feats, tmp_path):
    out = tmp_path / "sweep"
    res = invoke("sweep", "--features", str(feats), "--out", str(out),
                 *fast("noise.kind=symmetric", "noise.rate=0.3", "sweep.cleaner.subset_size=[1, 2]",
                       'sweep.cleaner.weighting=["constant", "fc_fc_relu_sig"]'))
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4
    accs = [float(r["val_accuracy"]) for r in rows]
    assert accs == sorted(accs, reverse=True)  # ranked on validation, never on test
    assert [r["chosen"] for r in rows] == ["*", "", "", ""]
    assert {(r["cleaner.subset_size"], r["cleaner.weighting"]) for r in rows} == {
        ("1", "constant"), ("1", "fc_fc_relu_sig"), ("2", "constant"), ("2", "fc_fc_relu_sig")}
    assert (out / "results.md").read_text().startswith("| chosen | cleaner.subset_size | cleaner.weighting |")
    res = invoke("sweep", "--features", str(feats), "--out", str(tmp_path / "s2"), *fast())
    assert res.exit_code == 2 and "[sweep] is empty" in res.output


def test_human_checks_count_where_the_true_label_is_unknown(tmp_path):
    """Food-101N style: no true labels, but a verification flag (1 right, 0 wrong) on some given labels."""
    import h5py

    d = tmp_path / "feats"
    write_synthetic_store(d / "train.h5", 300, 24, 5, seed=2, spread=1.0, split="train")
    rng = np.random.default_rng(0)
    with h5py.File(d / "train.h5", "r+") as f:
        labels = f["labels"][:]
        wrong = rng.random(300) < 0.3
        labels[wrong] = (labels[wrong] + 1 + rng.integers(0, 4, wrong.sum())) % 5  # labels made wrong
        checked = rng.random(300) < 0.5
        f["labels"][:] = labels
        f["clean_labels"][:] = -1
        f.create_dataset("verified", data=np.where(checked, (~wrong).astype(np.int8), -1).astype(np.int8))
    out = tmp_path / "run"
    res = invoke("train-head", "--features", str(d), "--out", str(out), *fast("noise.kind=none"))
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["detection"]["classifier"]["known"] == checked.sum()
    assert m["detection"]["classifier"]["flipped"] == (checked & wrong).sum()
    assert m["detection"]["classifier"]["auroc"] > 0.6  # the wrong labels are findable (0.5 = chance)
    rows = {r["id"]: r for r in csv.DictReader(open(out / "scores.csv"))}
    ids = [f"synthetic/train/{i:07d}" for i in range(300)]
    assert [rows[i]["given_label_correct"] for i in ids] == ["" if not c else str(int(not w))
                                                             for c, w in zip(checked, wrong)]
    assert all(r["clean_label"] == "" for r in rows.values())
