"""Accuracy under label noise: MetaCleaner vs the softmax baseline, LogisticRegression and cleanlab.

    make demo   # writes runs/demo/features/{train,test}.h5 (Fashion-MNIST, EfficientNet-Lite0, 96 px)
    .venv/bin/python bench/accuracy.py [--features runs/demo/features] [--rates 0 0.2 0.4 0.6 0.8]

On the same cached features, for each rate of uniform label flips (the
paper's noise), in one run: mcpipe's N = 1 baseline, MetaCleaner with
N in {2, 4, 6}, scikit-learn LogisticRegression, and cleanlab's
CleanLearning around it. Then, at 40 % flips, the ablations: the seven
weighting variants and hallucinate vs loss reweighting, with test accuracy
and the detection AUROC of each clean score, and the three subset-mining
modes. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from mcpipe.cleaner.noise import apply_noise
from mcpipe.cleaner.run import prepare, train_head
from mcpipe.config import load_config, with_overrides

WEIGHTINGS = ("constant", "attention_sig", "attention_exp", "fc_fc_sig", "fc_fc_relu_sig", "fc_relu_fc_relu_sig",
              "relation")


def sklearn_baselines(prep, rate: float, seed: int) -> tuple[float, float]:
    """(LogisticRegression, cleanlab CleanLearning(LogisticRegression)) test accuracy."""
    from cleanlab.classification import CleanLearning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = prep.train.features.astype(np.float32)
    y = apply_noise(prep.train.labels, prep.train.num_classes, kind="symmetric" if rate else "none", rate=rate,
                    seed=seed)
    xt, yt = prep.test.features.astype(np.float32), prep.test.labels
    model = lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))  # noqa: E731
    lr = model().fit(x, y).score(xt, yt)
    cl = CleanLearning(model(), seed=seed, cv_n_folds=5).fit(x, y)
    return float(lr), float((cl.predict(xt) == yt).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, default=Path("runs/demo/features"))
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8])
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--ablation-rate", type=float, default=0.4)
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config overrides")
    p.add_argument("--no-ablation", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not (args.features / "train.h5").exists():
        raise SystemExit(f"{args.features}/train.h5 is missing: run `make demo` first (or pass --features)")
    base = load_config(None, ["noise.kind=symmetric", "train.device=cpu", *args.sets])
    prep = prepare(base, args.features)
    print(f"features {args.features}: {len(prep.train.labels)} train / {len(prep.test.labels)} test, "
          f"{prep.train.feature_dim}-d {prep.train.attrs['backbone']}; epochs {base.train.epochs}, "
          f"batch {base.train.batch_size}, lr {base.train.lr} (/10 every {base.train.lr_step})", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="mcpipe-bench-"))

    def head(point: dict) -> dict:
        cfg = with_overrides(base, point)
        return train_head(cfg, prep, tmp / f"run{time.monotonic_ns()}", overwrite=True)

    cols = ["N=1 (baseline)", *(f"MetaCleaner N={n}" for n in args.sizes), "LogisticRegression", "cleanlab"]
    print("\n| flips | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols), flush=True)
    for rate in args.rates:
        accs = []
        for n in [1, *args.sizes]:
            accs.append(head({"noise.rate": rate, "cleaner.subset_size": n})["test_accuracy"])
        accs += list(sklearn_baselines(prep, rate, base.noise.seed))
        best = max(accs)
        cells = [f"**{a:.4f}**" if a == best else f"{a:.4f}" for a in accs]
        print(f"| {rate:.0%} | " + " | ".join(cells) + " |", flush=True)

    if args.no_ablation:
        return
    r = args.ablation_rate
    print(f"\nAblations at {r:.0%} flips, N = 4 (AUROC: detecting flipped training labels by each clean score)")
    print("\n| weighting | combine | test accuracy | alpha AUROC | classifier AUROC | knn AUROC |\n|---|---|---|---|---|---|")
    runs = [(w, "hallucinate") for w in WEIGHTINGS] + [("fc_fc_relu_sig", "loss_reweight"),
                                                       ("relation", "loss_reweight")]
    for weighting, combine in runs:
        m = head({"noise.rate": r, "cleaner.subset_size": 4, "cleaner.weighting": weighting,
                  "cleaner.combine": combine})
        d = m["detection"]
        au = lambda k: f"{d[k]['auroc']:.3f}" if k in d else "-"  # noqa: E731
        print(f"| {weighting} | {combine} | {m['test_accuracy']:.4f} | {au('alpha')} | {au('classifier')} | "
              f"{au('knn')} |", flush=True)

    print(f"\nSubset mining at {r:.0%} flips, N = 4, fc_fc_relu_sig\n\n| mining | test accuracy |\n|---|---|")
    for mining in ("random", "knn", "agreement"):
        m = head({"noise.rate": r, "cleaner.subset_size": 4, "cleaner.mining": mining})
        print(f"| {mining} | {m['test_accuracy']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
