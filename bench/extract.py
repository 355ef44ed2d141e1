"""Extraction throughput: mcpipe extract vs a plain torchvision loop vs the bare forward.

    .venv/bin/python bench/extract.py [--images 256] [--size 224] [--device cpu]

On the same synthetic JPEG photos (smooth colour fields with shapes, 500x375,
written once to a temp folder), in one process, one after another:

  (a) mcpipe extract -- ``mcpipe.extract.run.run(cfg)``, the code behind the CLI:
      DataLoader workers, channels_last, writer thread, HDF5 store;
  (b) plain loop -- torchvision ImageFolder + the standard eval transform,
      fp32 NCHW, batch 32, num_workers=0, features kept in a list and saved
      with numpy at the end;
  (c) bare forward -- mcpipe's inference model on tensors already in memory
      (no decoding, no writing): the ceiling for (a);
  and decoding + preprocessing alone, to say what bounds (a).

ResNet50 with random weights (timing does not depend on the values). The
three run in turn ``--repeats`` times (the machine is noisy); each method's
best run counts. Prints images/s of every run, the best, and the ratios a/b
and a/c.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw
from torchvision import transforms as T

from mcpipe.config import load_config
from mcpipe.extract.backbones import build_backbone, optimize_for_inference
from mcpipe.extract.images import open_image
from mcpipe.extract.preprocess import eval_transform, preprocess_for
from mcpipe.extract.run import run


def make_photos(root: Path, n: int, *, classes: int = 4, size=(500, 375), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
            r = int(rng.integers(10, 80))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img.save(d / f"{i:05d}.jpg", quality=90)


def bench_mcpipe(root: Path, out: Path, args) -> float:
    cfg = load_config(None, [
        "data.source=imagefolder", f"data.root={root}", "extract.backbone=resnet50", "extract.weights=none",
        f"extract.image_size={args.size}", f"extract.batch_size={args.batch}", f"extract.device={args.device}",
    ])
    t = time.perf_counter()
    results = run(cfg, out=out, overwrite=True, progress=False)
    seconds = time.perf_counter() - t
    assert results[0].complete and results[0].extracted == args.images
    return args.images / seconds


def bench_plain(root: Path, out: Path, args) -> float:
    t = time.perf_counter()
    tf = T.Compose([T.Resize(256 * args.size // 224), T.CenterCrop(args.size), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = torchvision.datasets.ImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(args.device)
    feats = []
    with torch.inference_mode():
        for x, _ in loader:
            feats.append(model(x.to(args.device)).cpu().numpy())
    np.save(out / "plain.npy", np.concatenate(feats))
    return len(ds) / (time.perf_counter() - t)


def bench_forward(args) -> float:
    backbone = build_backbone("resnet50", "none", image_size=args.size)
    device = torch.device(args.device)
    model = optimize_for_inference(backbone, device)
    pre = preprocess_for("resnet50", args.size)
    x = torch.randn(args.batch, 3, pre.image_size, pre.image_size).contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    batches = -(-args.images // args.batch)
    with torch.inference_mode():
        model(x)  # warm-up (oneDNN primitive creation)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(batches):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches * args.batch / (time.perf_counter() - t)


def bench_decode(root: Path, args) -> float:
    """Decoding + preprocessing alone, one process: what a DataLoader worker has to keep up with."""
    tf = eval_transform(preprocess_for("resnet50", args.size))
    files = sorted(root.rglob("*.jpg"))
    t = time.perf_counter()
    for f in files:
        tf(open_image(f, min_size=preprocess_for("resnet50", args.size).resize))
    return len(files) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32, help="batch size of (a) and (c); (b) always uses 32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    logging.getLogger("mcpipe").setLevel(logging.ERROR)  # the random-init warning is expected here
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"device {args.device}, {args.images} JPEG images 500x375 -> {args.size} px, batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "out"
        out.mkdir()
        make_photos(root, args.images)
        runs: dict[str, list[float]] = {"c": [], "b": [], "a": []}
        for _ in range(args.repeats):
            runs["c"].append(bench_forward(args))
            runs["b"].append(bench_plain(root, out, args))
            runs["a"].append(bench_mcpipe(root, out, args))
        decode = bench_decode(root, args)
    names = {"c": "(c) bare forward     ", "b": "(b) plain torchvision", "a": "(a) mcpipe extract   "}
    for key in ("c", "b", "a"):
        every = ", ".join(f"{v:.1f}" for v in runs[key])
        print(f"{names[key]} {max(runs[key]):8.1f} img/s   (runs: {every})")
    a, b, c = max(runs["a"]), max(runs["b"]), max(runs["c"])
    print(f"decode + preprocess alone: {decode:.1f} img/s on one core ({1000 / decode:.1f} ms/image; "
          f"the forward takes {1000 / c:.1f} ms/image)")
    print(f"a/b = {a / b:.2f}   (target >= 1.3)")
    print(f"a/c = {a / c:.2f}   (target >= 0.9)")


if __name__ == "__main__":
    sys.exit(main())
