"""train.auto: the validation split, batched linear heads, the second round, and choosing without the test split."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mcpipe.cleaner.issues import cleaned, corrected_gain, find_issues, noise_matrix
from mcpipe.cleaner.linear import fit_linear_heads
from mcpipe.cleaner.noise import apply_noise
from mcpipe.cleaner.split import folds, holdout
from mcpipe.cli import app
from mcpipe.config import TrainConfig
from mcpipe.store.synthetic import write_synthetic_store

FAST = ["train.epochs=4", "train.lr_step=3", "train.batch_size=64", "cleaner.hidden=16", "train.device=cpu",
        "cleaner.score_repeats=2", "cleaner.knn_k=5", "train.cv_folds=3", "train.val_fraction=0.2",
        "train.search_weight_decays=[0.001, 0.1]"]


def timeless(search: dict) -> dict:
    """A search record without its timings (the one thing two identical runs may differ in)."""
    return {**{k: v for k, v in search.items() if k != "seconds"},
            "candidates": [{k: v for k, v in c.items() if k != "seconds"} for c in search["candidates"]]}


def run_head(feats, out, *items: str):
    args = ["train-head", "--features", str(feats), "--out", str(out)]
    for s in (*FAST, *items):
        args += ["--set", s]
    return CliRunner().invoke(app, args)


# --------------------------------------------------------------------------- pure parts


def test_holdout_and_folds_are_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(4), [50, 30, 10, 1])
    fit, val = holdout(y, 0.2, seed=3)
    assert np.intersect1d(fit, val).size == 0 and len(fit) + len(val) == len(y)
    assert [int((y[val] == c).sum()) for c in range(4)] == [10, 6, 2, 0]  # a 1-image class stays in training
    assert np.array_equal(val, holdout(y, 0.2, seed=3)[1]) and not np.array_equal(val, holdout(y, 0.2, seed=4)[1])
    f = folds(y, 5, seed=0)
    assert set(f) == set(range(5))
    for c in range(3):  # every fold gets its share of each class
        counts = np.bincount(f[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1


def test_batched_heads_train_as_if_alone():
    """H heads in one pass = each head trained on its own (same batches): they never interact."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(300, 8)).astype(np.float32))
    y = rng.integers(0, 3, size=300)
    rows = np.arange(250)
    labels = np.stack([y[rows], (y[rows] + 1) % 3])
    weights = np.stack([np.ones(250, np.float32), (rng.random(250) > 0.3).astype(np.float32)])
    t = TrainConfig(epochs=3, lr_step=2, batch_size=32, lr=0.05)
    common = dict(num_classes=3, mean=torch.zeros(8), std=torch.ones(8), train=t, seed=1,
                  val=(x[250:], y[250:]))
    both = fit_linear_heads(x, rows, labels, weights, np.array([0.01, 0.3]), **common)
    for h, wd in enumerate((0.01, 0.3)):
        alone = fit_linear_heads(x, rows, labels[h:h + 1], weights[h:h + 1], np.array([wd]), **common)
        assert torch.allclose(both.weight[h], alone.weight[0], atol=1e-5)
        assert both.best_epoch[h] == alone.best_epoch[0]
    assert not torch.allclose(both.weight[0], both.weight[1])


def test_second_round_bookkeeping():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    given = np.array([0, 0, 1])
    issues = np.array([False, True, True])
    y, w = cleaned(given, probs, issues, "drop")
    assert y.tolist() == [0, 0, 1] and w.tolist() == [1, 0, 0]
    y, w = cleaned(given, probs, issues, "relabel")
    assert y.tolist() == [0, 1, 0] and w.tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        cleaned(given, probs, issues, "burn")


def test_issues_find_planted_pair_flips_and_the_noise_matrix():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, size=2000)
    given = apply_noise(true, 4, kind="pairflip", rate=0.3, seed=0)
    logits = np.eye(4)[true] * 3 + rng.normal(size=(2000, 4))   # a good, out-of-sample model of the TRUE class
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    issues = find_issues(given, probs)
    wrong = given != true
    assert (issues & wrong).sum() / issues.sum() > 0.8 and (issues & wrong).sum() / wrong.sum() > 0.8
    t = noise_matrix(given, probs)
    assert np.allclose(t.sum(1), 1) and np.all(np.diag(t) > 0.55) and np.all(t[np.arange(4), (np.arange(4) + 1) % 4] > 0.15)
    gain = corrected_gain(t)
    # predictions made independently of the flips (a held-out model): the corrected score estimates the accuracy
    # against the true labels, which the given labels understate
    confused = np.where(rng.random(2000) < 0.3, (true + 1) % 4, true)
    for pred in (true, confused):
        acc = (pred == true).mean()
        assert abs(gain[pred, given].mean() - acc) < 0.08 and (pred == given).mean() < acc - 0.1
    assert np.allclose(corrected_gain(np.eye(4)), np.eye(4))


# --------------------------------------------------------------------------- the run


def test_auto_run_chooses_on_validation_and_records_both_rounds(feats, tmp_path):
    out = tmp_path / "run"
    res = run_head(feats, out, "noise.kind=symmetric", "noise.rate=0.3")
    assert res.exit_code == 0, res.output
    assert "chose " in res.output and "on validation" in res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["chosen_on"] == "val" and abs(m["validation"]["images"] - 120) <= 3
    names = [c["name"] for c in m["search"]["candidates"]]
    assert len(names) == 2 + 1 + 4 and m["search"]["chosen"] in names  # softmax x2, N = 4, round 2 x (2 x 2)
    chosen = next(c for c in m["search"]["candidates"] if c["name"] == m["search"]["chosen"])
    assert chosen["val_score"] == max(c["val_score"] for c in m["search"]["candidates"])
    assert 0 <= m["val_accuracy"] <= 1 and 0 <= m["val_clean_accuracy"] <= 1 and "test_accuracy_before_refit" in m
    li = m["label_issues"]
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 600 and sum(r["label_issue"] == "1" for r in rows) == li["flagged"] > 0
    assert sum(r["split"] == "val" for r in rows) == m["validation"]["images"]
    assert all(r["cross_validated_score"] != "" for r in rows)
    if chosen["action"] == "drop":
        assert all((r["trained_label"] == "") == (r["label_issue"] == "1") for r in rows)
    assert "cross_validated" in m["detection"] and "f1_at_estimate" in m["detection"]["classifier"]
    head = torch.load(out / "head.pt", weights_only=True)
    assert head["head"]["subset_size"] == chosen["subset_size"]


def test_selection_never_reads_the_test_split(feats, tmp_path):
    """Poison the test labels: the test accuracy changes, every choice and every trained weight does not."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(feats, poisoned, ignore=shutil.ignore_patterns("*.lock"))
    with h5py.File(poisoned / "test.h5", "r+") as f:
        f["labels"][...] = (f["labels"][:] + 1) % 5
    a, b = tmp_path / "a", tmp_path / "b"
    for d, out in ((feats, a), (poisoned, b)):
        res = run_head(d, out, "noise.kind=pairflip", "noise.rate=0.3")
        assert res.exit_code == 0, res.output
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (a, b))
    assert ma["test_accuracy"] != mb["test_accuracy"]
    assert timeless(ma["search"]) == timeless(mb["search"]) and ma["val_accuracy"] == mb["val_accuracy"]
    ha, hb = (torch.load(o / "head.pt", weights_only=True)["state_dict"] for o in (a, b))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)


def test_auto_resumes_after_its_search(feats, tmp_path):
    out = tmp_path / "run"
    assert run_head(feats, out, "noise.kind=symmetric", "noise.rate=0.3").exit_code == 0
    before = json.loads((out / "metrics.json").read_text())
    res = CliRunner().invoke(app, ["train-head", "--features", str(feats), "--out", str(out), "--resume",
                                   *sum((["--set", s] for s in (*FAST, "noise.kind=symmetric", "noise.rate=0.3")),
                                        [])])
    assert res.exit_code == 0, res.output
    after = json.loads((out / "metrics.json").read_text())
    assert timeless(after["search"]) == timeless(before["search"]) and after["test_accuracy"] == before["test_accuracy"]


def test_auto_without_validation_is_refused(feats, tmp_path):
    res = run_head(feats, tmp_path / "run", "train.val_fraction=0")
    assert res.exit_code == 2 and "train.auto" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_a_val_store_chooses_and_is_never_trained_on(tmp_path):
    """val.h5 beside train.h5 replaces the hold-out; images it shares with train.h5 are left out of training."""
    d = tmp_path / "feats"
    write_synthetic_store(d / "train.h5", 400, 24, 5, seed=1, spread=1.0, split="train")
    write_synthetic_store(d / "val.h5", 100, 24, 5, seed=2, spread=1.0, split="train")  # ids = the first 100
    write_synthetic_store(d / "test.h5", 100, 24, 5, seed=3, spread=1.0, split="test")
    out = tmp_path / "run"
    res = run_head(d, out, "noise.kind=symmetric", "noise.rate=0.2")
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["validation"] == {"source": "val.h5", "images": 100} and m["search"]["refit"] is False
    assert m["train_images"] == 400 and "test_accuracy_before_refit" not in m
    rows = list(csv.DictReader(open(out / "scores.csv")))
    left_out = {r["id"] for r in rows if r["split"] == "val"}
    assert left_out == {f"synthetic/train/{i:07d}" for i in range(100)}
