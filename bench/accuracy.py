"""Accuracy under label noise: mcpipe's default against tuned peers, on the same cached features.

    make demo   # writes runs/demo/features/{train,test}.h5 (Fashion-MNIST, EfficientNet-Lite0, 96 px)
    .venv/bin/python bench/accuracy.py [--features runs/demo/features] [--settings none symmetric:0.4 ...]

For every noise setting (uniform flips 0-80 %, pair flips c -> c+1, and
instance-dependent flips towards the nearest other class), the same noisy
labels go to every method, and every method chooses on the same validation
split: mcpipe's seeded, stratified 10 % hold-out of the training rows with
their *given* labels. The test split is only reported. Methods:

* LogisticRegression on standardised features, C from a grid picked on
  validation, then refitted on all training rows (GridSearchCV's refit);
* cleanlab ``CleanLearning`` around that tuned model (its own 5-fold
  cross-validation), fitted on all training rows;
* a kNN vote (FAISS, cosine on standardised features), k picked on validation,
  all training rows as neighbours;
* mcpipe N = 1 (softmax) with its weight decay picked on validation
  (``train.auto = false``, one run per value, as a user would sweep it);
* mcpipe's paper configuration: MetaCleaner N = 4, fc_fc_relu_sig, ``train.auto = false``;
* mcpipe's default (``train.auto = true``), which also prints what it chose.

Then the noise-detection quality of mcpipe's default and of cleanlab:
AUROC and average precision of their clean scores, and the F1 of the labels
each flags at its own estimate of the noise rate. Last, the cost of the
default's search as a ratio to one fixed-configuration run (the paper
configuration) on the same features, measured in this run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from mcpipe.cleaner.noise import noise_from_config
from mcpipe.cleaner.prepare import prepare
from mcpipe.cleaner.run import train_head
from mcpipe.cleaner.split import holdout
from mcpipe.config import Config, load_config, with_overrides

SETTINGS = ("none", "symmetric:0.2", "symmetric:0.4", "symmetric:0.6", "symmetric:0.8", "pairflip:0.2",
            "pairflip:0.4", "instance:0.2", "instance:0.4")
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
K_GRID = (1, 5, 10, 20, 50, 100)


def _standardised(prep) -> tuple[np.ndarray, np.ndarray]:
    x = prep.train.features.astype(np.float32)
    xt = prep.test.features.astype(np.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    return (x - mean) / std, (xt - mean) / std


def logistic(x, given, fit, val, xt, yt, seed: int) -> tuple[float, float]:
    """(test accuracy, C): C picked on validation, then refitted on all training rows."""
    from sklearn.linear_model import LogisticRegression

    scores = [LogisticRegression(C=c, max_iter=1000).fit(x[fit], given[fit]).score(x[val], given[val])
              for c in C_GRID]
    c = C_GRID[int(np.argmax(scores))]
    return float(LogisticRegression(C=c, max_iter=1000).fit(x, given).score(xt, yt)), c


def cleanlab_peer(x, given, xt, yt, c: float, seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(test accuracy, label quality (M,), is_label_issue (M,)) of CleanLearning around LogisticRegression(C=c)."""
    from cleanlab.classification import CleanLearning
    from sklearn.linear_model import LogisticRegression

    cl = CleanLearning(LogisticRegression(C=c, max_iter=1000), seed=seed, cv_n_folds=5, verbose=False)
    cl.fit(x, given)
    issues = cl.get_label_issues()
    return (float((cl.predict(xt) == yt).mean()), issues["label_quality"].to_numpy(),
            issues["is_label_issue"].to_numpy())


def knn_vote(x, given, fit, val, xt, yt, num_classes: int) -> tuple[float, int]:
    """(test accuracy, k): majority vote of the k nearest (cosine) training images, k picked on validation."""
    def unit(a):
        return np.ascontiguousarray(a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12), dtype=np.float32)

    def votes(base, labels, queries, k):
        _, nb = faiss.knn(unit(queries), unit(base), k, metric=faiss.METRIC_INNER_PRODUCT)
        counts = np.zeros((len(queries), num_classes))
        np.add.at(counts, (np.repeat(np.arange(len(queries)), k), labels[nb].ravel()), 1)
        return counts.argmax(1)

    scores = [(votes(x[fit], given[fit], x[val], k) == given[val]).mean() for k in K_GRID]
    k = K_GRID[int(np.argmax(scores))]
    return float((votes(x, given, xt, k) == yt).mean()), k


def detection(clean_score: np.ndarray, flagged: np.ndarray, wrong: np.ndarray) -> str:
    """"AUROC / AP / F1" of finding the wrong labels: score ranks, ``flagged`` is the method's own call."""
    if not wrong.any() or wrong.all():
        return "-"
    return (f"{roc_auc_score(wrong, -clean_score):.3f} / {average_precision_score(wrong, -clean_score):.3f} / "
            f"{f1_score(wrong, flagged):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, default=Path("runs/demo/features"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), help="kind:rate, e.g. symmetric:0.4")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config overrides")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not (args.features / "train.h5").exists():
        raise SystemExit(f"{args.features}/train.h5 is missing: run `make demo` first (or pass --features)")
    started = time.perf_counter()
    base = load_config(None, ["train.device=cpu", *args.sets])
    prep = prepare(base, args.features)
    x, xt = _standardised(prep)
    yt = prep.test.labels
    num_classes = prep.train.num_classes
    print(f"features {args.features}: {len(prep.train.labels)} train ({base.train.val_fraction:.0%} held out for "
          f"validation) / {len(yt)} test, {prep.train.feature_dim}-d {prep.train.attrs['backbone']}; "
          f"epochs {base.train.epochs}, batch {base.train.batch_size}, lr {base.train.lr}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="mcpipe-bench-"))

    def head(cfg: Config) -> dict:
        out = tmp / f"run{time.monotonic_ns()}"
        return train_head(cfg, prep, out, overwrite=True).to_dict() | {"run_dir": out}

    cols = ["mcpipe default", "mcpipe N=1, wd tuned", "MetaCleaner N=4 (paper)", "LogisticRegression, C tuned",
            "cleanlab around it", "kNN, k tuned"]
    print("\n| noise | " + " | ".join(cols) + " | default chose |\n|---|" + "---|" * (len(cols) + 1), flush=True)
    detections, costs = [], []
    for setting in args.settings:
        kind, _, rate = setting.partition(":")
        cfg = with_overrides(base, {"noise.kind": kind, "noise.rate": float(rate or 0)})
        given = (prep.train.labels.copy() if kind == "none" else
                 noise_from_config(prep.train.labels, num_classes, cfg.noise, features=prep.train.features))
        wrong = given != prep.train.labels
        fit, val = holdout(given, cfg.train.val_fraction, seed=cfg.train.seed)

        default = head(cfg)
        ones = [head(with_overrides(cfg, {"train.auto": False, "cleaner.subset_size": 1, "train.weight_decay": wd}))
                for wd in cfg.train.search_weight_decays]
        n1 = max(ones, key=lambda m: m["val_accuracy"])  # first on ties
        paper = head(with_overrides(cfg, {"train.auto": False, "cleaner.subset_size": 4,
                                          "cleaner.weighting": "fc_fc_relu_sig"}))
        lr, c = logistic(x, given, fit, val, xt, yt, cfg.train.seed)
        cl, quality, cl_issues = cleanlab_peer(x, given, xt, yt, c, cfg.train.seed)
        kn, k = knn_vote(x, given, fit, val, xt, yt, num_classes)

        accs = [default["test_accuracy"], n1["test_accuracy"], paper["test_accuracy"], lr, cl, kn]
        best = max(accs)
        cells = [f"**{a:.4f}**" if a == best else f"{a:.4f}" for a in accs]
        name = "none" if kind == "none" else f"{kind} {float(rate):.0%}"
        print(f"| {name} | " + " | ".join(cells) + f" | {default['search']['chosen']} |", flush=True)
        costs.append(default["seconds"] / paper["seconds"])
        if wrong.any():
            scores = _scores_csv(default["run_dir"], list(prep.train.ids))
            mine = detection(scores["classifier"], scores["issue"], wrong)
            detections.append(f"| {name} | {mine} | {detection(quality, cl_issues, wrong)} |")
    print("\nNoise detection, AUROC / average precision of the clean score / F1 of the labels flagged at the "
          "method's own noise estimate\n\n| noise | mcpipe default | cleanlab |\n|---|---|---|")
    print("\n".join(detections))
    print("\nCost of the default (search + refit) / one fixed-configuration run (MetaCleaner N = 4), per setting: "
          + " ".join(f"{r:.2f}" for r in costs) + f"; mean {np.mean(costs):.2f}")
    print(f"bench/accuracy.py: {time.perf_counter() - started:.0f} s")


def _scores_csv(run_dir: Path, ids: list[str]) -> dict[str, np.ndarray]:
    """A run's classifier score and label-issue flags per training row, in store order (from its scores.csv)."""
    import csv

    with open(run_dir / "scores.csv", encoding="utf-8") as f:
        by_id = {r["id"]: r for r in csv.DictReader(f)}
    rows = [by_id[i] for i in ids]
    return {"classifier": np.array([float(r["classifier_score"]) for r in rows]),
            "issue": np.array([r["label_issue"] == "1" for r in rows])}


if __name__ == "__main__":
    main()
