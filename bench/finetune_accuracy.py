"""Does stage 3 pay off? End-to-end fine-tuning with the cleaner against the head alone and plain fine-tuning.

    .venv/bin/python bench/finetune_accuracy.py [--out runs/bench-finetune] [--images 5000] [--size 64] ...

Real images the machine has: Fashion-MNIST (Debian's ``dataset-fashion-mnist``),
a seeded subset of ``--images`` training images and as many test
images, at ``--size`` pixels, through ImageNet-trained EfficientNet-Lite0. For
each share of uniformly flipped training labels (``--rates``; the same flips,
images and test split for every row), and with every choice made on the same
validation set (mcpipe's seeded, stratified 10 % hold-out of the training
images with their *given* labels, never trained on by any row; the test split
is only reported):

1. stage 2 only: ``mcpipe train-head`` on the cached features of the same
   images, the default (``train.auto``, which chooses on validation), and the
   fixed MetaCleaner N = 4 head that row 3 starts from;
2. plain end-to-end fine-tuning: N = 1 (the paper's softmax baseline), the
   backbone from ImageNet and a new classifier (``--fresh-lr``,
   ``--fresh-backbone-lr``: a new classifier needs a higher rate); and, as a
   best user would also try, plain fine-tuning started from stage 2's softmax
   head (N = 1, ``train.auto = false``: a linear probe, then fine-tuning), with
   row 3's rates;
3. the pipeline: the N = 4 head of row 1, then end-to-end fine-tuning with the
   cleaner in the loop (``mcpipe finetune --head``);
4. the same plus the paper's unload phase (cleaner dropped for the last
   ``--unload`` epochs). Row 3 is row 4's run read at the end of its cleaner
   phase: every phase has its own optimiser and schedule and every epoch its
   own seeds, so those epochs are exactly what a run without the unload phase
   trains.

Each fine-tuning row reports the test top-1 of the epoch chosen on validation
top-1 (for rows 3 and 4 epoch 0, the head as it came from stage 2, is a
candidate too), which is the model ``mcpipe finetune`` exports
(``finetune.export = "best"``). The shared settings (``--epochs``, learning
rates, ``--crop-scale``) were picked on the validation split in pilot runs,
the same for the rows that start from a head. Last, the wall time of the pipeline (stage 2's head +
fine-tuning) as a ratio to row 2's, all measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FMNIST = "/usr/share/datasets/fashion-mnist"


def mcpipe(*args: str) -> float:
    """Run one mcpipe command (its summary line printed); its wall time in seconds."""
    cmd = [sys.executable, "-m", "mcpipe", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"finetune_accuracy: {' '.join(args[:1])} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    print("   ", done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "(no output)", flush=True)
    return seconds


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))


def chosen(m: dict, phases: tuple[str, ...]) -> dict:
    """The history row (or the start) with the best validation top-1 among ``phases`` (ties: the earlier)."""
    rows = ([m["start"]] if "start" in m else []) + [h for h in m["history"] if h["phase"] in phases]
    return max(rows, key=lambda h: h["val_top1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-finetune"))
    ap.add_argument("--root", default=FMNIST, help="Fashion-MNIST folder (the idx .gz files)")
    ap.add_argument("--images", type=int, default=5000,
                    help="training images and test images, each a seeded subset of its split")
    ap.add_argument("--size", type=int, default=64, help="image size (EfficientNet-Lite0 input)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.4, 0.0], help="shares of flipped labels")
    ap.add_argument("--epochs", type=int, default=6, help="plain fine-tuning epochs (row 2)")
    ap.add_argument("--cleaner-epochs", type=int, default=4, help="epochs with the cleaner (row 3)")
    ap.add_argument("--unload", type=int, default=2, help="unload epochs after the cleaner phase (row 4)")
    ap.add_argument("--lr", type=float, default=0.001, help="head learning rate, runs started from a head")
    ap.add_argument("--backbone-lr", type=float, default=0.0001, help="backbone rate, runs started from a head")
    ap.add_argument("--fresh-lr", type=float, default=0.01, help="head learning rate, new classifier")
    ap.add_argument("--fresh-backbone-lr", type=float, default=0.003, help="backbone rate, new classifier")
    ap.add_argument("--warmup", type=float, default=0.3, help="warm-up epochs")
    ap.add_argument("--crop-scale", type=float, default=0.35)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    begin = time.perf_counter()
    out = args.out
    data = ["--set", "data.source=fashion-mnist", "--set", f"data.root={args.root}",
            "--set", "extract.backbone=efficientnet_lite0", "--set", f"extract.image_size={args.size}"]
    quiet = ["--log-level", "warning", "--overwrite"]
    feats = out / "features"
    print(f"== stage 1: features of {args.images} training and {args.images} test images, {args.size} px")
    if not (feats / "test.h5").is_file():  # data.limit: the same seeded subsets as finetune's below
        mcpipe("extract", "--out", str(feats), "--log-level", "warning", *data, "--set", f"data.limit={args.images}")
    rates = ["--set", f"finetune.lr={args.lr}", "--set", f"finetune.backbone_lr={args.backbone_lr}"]
    fresh = ["--set", f"finetune.lr={args.fresh_lr}", "--set", f"finetune.backbone_lr={args.fresh_backbone_lr}"]
    tune = ["--set", f"finetune.warmup_epochs={args.warmup}", "--set", f"finetune.crop_scale={args.crop_scale}", "--set", f"finetune.batch_size={args.batch_size}",
            "--set", f"finetune.workers={args.workers}", "--set", f"finetune.device={args.device}",
            "--set", f"data.limit={args.images}"]
    results = []
    for rate in args.rates:
        noise = ["--set", "noise.kind=" + ("symmetric" if rate > 0 else "none"), "--set", f"noise.rate={rate}"]
        tag = f"{rate:g}"
        print(f"== {rate:.0%} of the training labels flipped")
        row: dict = {"rate": rate}
        t = mcpipe("train-head", "--features", str(feats), "--out", str(out / f"head-auto-{tag}"), *quiet, *noise)
        row["head_auto"] = (metrics(out / f"head-auto-{tag}")["test_accuracy"], t)
        t = mcpipe("train-head", "--features", str(feats), "--out", str(out / f"head-n4-{tag}"), *quiet, *noise,
                   "--set", "train.auto=false", "--set", "cleaner.subset_size=4")
        row["head_n4"] = (metrics(out / f"head-n4-{tag}")["test_accuracy"], t)
        plain = out / f"plain-{tag}"
        t = mcpipe("finetune", "--out", str(plain), *quiet, *data, *noise, *tune, *fresh,
                   "--set", "cleaner.subset_size=1", "--set", f"finetune.epochs={args.epochs}")
        m = metrics(plain)
        row["plain"] = (m["test_accuracy"], t, m["best_epoch"])
        t = mcpipe("train-head", "--features", str(feats), "--out", str(out / f"head-n1-{tag}"), *quiet, *noise,
                   "--set", "train.auto=false", "--set", "cleaner.subset_size=1")
        lpft = out / f"plain-from-head-{tag}"
        t += mcpipe("finetune", "--head", str(out / f"head-n1-{tag}"), "--out", str(lpft), *quiet, *data, *noise,
                    *tune, *rates, "--set", "cleaner.subset_size=1", "--set", f"finetune.epochs={args.epochs}")
        m = metrics(lpft)
        row["lpft"] = (m["test_accuracy"], t, m["best_epoch"])
        pipe = out / f"pipeline-{tag}"
        t = mcpipe("finetune", "--head", str(out / f"head-n4-{tag}"), "--out", str(pipe), *quiet, *data, *noise,
                   *tune, *rates, "--set", f"finetune.epochs={args.cleaner_epochs}",
                   "--set", f"finetune.unload_epochs={args.unload}")
        m = metrics(pipe)
        cleaner = chosen(m, ("cleaner",))
        cleaner_seconds = max([h["seconds"] for h in m["history"] if h["phase"] == "cleaner"])
        unload_seconds = m["history"][-1]["seconds"] - cleaner_seconds
        row["pipeline"] = (cleaner["test_top1"], row["head_n4"][1] + t - unload_seconds, cleaner["epoch"])
        row["unload"] = (m["test_accuracy"], row["head_n4"][1] + t, m["best_epoch"])
        results.append(row)
    print()
    print(f"Fashion-MNIST, {args.images} training images ({args.images // 10} of them held out for validation), "
          f"{args.images} test images, EfficientNet-Lite0 (ImageNet) at {args.size} px; "
          f"fine-tuning: plain {args.epochs} epochs, cleaner {args.cleaner_epochs} (+{args.unload} unload); "
          f"lr / backbone lr {args.fresh_lr} / {args.fresh_backbone_lr} (new classifier), {args.lr} / "
          f"{args.backbone_lr} (from a head); cosine, warm-up {args.warmup}; crop scale {args.crop_scale}, batch {args.batch_size}; test top-1 of the epoch chosen on validation")
    names = [("head_auto", "1. stage 2 only: the default head (train.auto)"),
             ("head_n4", "1. stage 2 only: the MetaCleaner N = 4 head (row 3's start)"),
             ("plain", "2. plain fine-tuning, N = 1, new classifier"),
             ("lpft", "2. plain fine-tuning, N = 1, from the softmax head"),
             ("pipeline", "3. pipeline: N = 4 head, fine-tuned with the cleaner"),
             ("unload", "4. pipeline + unload phase")]
    header = f"{'':58}" + "".join(f"{r['rate']:>8.0%} flips, epoch, wall s" for r in results)
    print(header)
    for key, name in names:
        cells = ""
        for r in results:
            v = r[key]
            cells += f"{v[0]:>14.4f}  {('' if len(v) < 3 else v[2]):>5}  {v[1]:>7.0f}"
        print(f"{name:58}{cells}")
    for r in results:
        print(f"{r['rate']:.0%}: wall time pipeline / plain fine-tuning = {r['pipeline'][1] / r['plain'][1]:.2f} "
              f"(with unload {r['unload'][1] / r['plain'][1]:.2f})")
    print(f"bench/finetune_accuracy.py: {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
