"""Training speed of mcpipe finetune (MetaCleaner N = 4 in the loop) against a plain torchvision loop.

    .venv/bin/python bench/finetune_speed.py [--images 384] [--size 64] [--batch 32] [--rounds 2]

Writes seeded JPEGs (8 classes, 96 x 96) once under --dir. Then, alternating
in one process for --rounds rounds, one epoch of each, best round reported:

(a) ``mcpipe finetune``'s own training (``mcpipe.finetune.run.run``, phase 1 only,
    no test split): ResNet50 (random init), K x N = 8 x 4 subsets through the
    cleaner (paper weighting fc_fc_relu_sig, hidden 384), fused SGD, seeded
    augmentation; images/s as its metrics.json records it;
(b) a plain loop: torchvision ``ImageFolder`` with the same training transform,
    a shuffled ``DataLoader`` with the same batch size and workers, ResNet50 +
    linear classifier, cross-entropy, SGD with momentum; images/s over the epoch.

Same device, image size, batch size and workers. Prints images/s and the ratio
a/b (the cleaner's overhead target: a/b >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from mcpipe.config import load_config
from mcpipe.extract.preprocess import preprocess_for, train_transform


def write_images(root: Path, n: int, classes: int = 8) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg", quality=90)


def mcpipe_epoch(root: Path, size: int, batch: int, workers: int, device: str) -> float:
    from mcpipe.finetune.run import run

    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", "extract.backbone=resnet50",
                             "extract.weights=none", f"extract.image_size={size}", f"finetune.batch_size={batch}",
                             "finetune.epochs=1", f"finetune.workers={workers}", f"finetune.device={device}",
                             "finetune.test_split=", "cleaner.subset_size=4", "cleaner.hidden=384",
                             "cleaner.weighting=fc_fc_relu_sig"])
    with tempfile.TemporaryDirectory() as out:
        m = run(cfg, out=Path(out) / "run")
    return m.history[0].images_per_second


def plain_epoch(root: Path, size: int, batch: int, workers: int, device: str) -> float:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    pre = preprocess_for("resnet50", size)
    data = torchvision.datasets.ImageFolder(str(root / "train"), transform=train_transform(pre))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    net = torchvision.models.resnet50(weights=None, num_classes=len(data.classes)).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    net.train()
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", type=Path, default=Path("/tmp/mcpipe-finetune-speed"))
    args = p.parse_args()
    root = args.dir / f"{args.images}"
    if not (root / "train").is_dir():
        write_images(root, args.images)
    runs: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(args.rounds):
        runs["a"].append(mcpipe_epoch(root, args.size, args.batch, args.workers, args.device))
        runs["b"].append(plain_epoch(root, args.size, args.batch, args.workers, args.device))
    a, b = max(runs["a"]), max(runs["b"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; ResNet50 random init, "
          f"{args.images} JPEGs 96x96 -> {args.size} px (random resized crop + flip), batch {args.batch}, "
          f"{args.workers} workers, best of {args.rounds} epochs each")
    print(f"(a) mcpipe finetune, N = 4   {a:7.1f} img/s   (runs: {', '.join(f'{v:.1f}' for v in runs['a'])})")
    print(f"(b) plain torchvision loop   {b:7.1f} img/s   (runs: {', '.join(f'{v:.1f}' for v in runs['b'])})")
    print(f"a/b = {a / b:.2f}   (target >= 0.9)")
    print(json.dumps({"a": a, "b": b, "ratio": a / b}))


if __name__ == "__main__":
    main()
