"""``mcpipe predict``: classify images with an exported finetune run, write one CSV row per image.

Inputs are any mix of image files, folders (every image file below them,
recursively, in sorted order) and manifests (a ``.csv``/``.tsv`` table whose
header has a ``path`` column; paths relative to the manifest's folder, which
they may not leave). The model is read with :func:`load_model` and images are
preprocessed with its own eval preprocessing (``model.json``), so predictions
match what the run was evaluated with.

The output CSV (written atomically) has the columns::

    id,predicted,probability,top_k,status

``id`` is the file path as given, or the path relative to its folder or
manifest; ``probability`` is the predicted class's softmax probability (6
decimals); ``top_k`` is ``class:prob;class:prob;...`` best first (4 decimals);
``status`` is ``ok`` or ``skipped: <reason>`` for an image that cannot be read
(that row's prediction cells are empty). A bad image never stops the run.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from mcpipe.atomic import replacing
from mcpipe.devices import resolve_device
from mcpipe.errors import ConfigError, DataError
from mcpipe.extract.images import IMAGE_SUFFIXES, ImageSkip, open_image
from mcpipe.extract.preprocess import Preprocess, eval_transform
from mcpipe.finetune.export import load_model
from mcpipe.labels import read_table
from mcpipe.paths import safe_relpath
from mcpipe.progress import progress_bar

MANIFEST_SUFFIXES = (".csv", ".tsv")
COLUMNS = ("id", "predicted", "probability", "top_k", "status")


class _Images(Dataset):
    """``ds[i]`` -> (i, image (3, S, S) float32 (zeros when unreadable), status "ok" or "skipped: <reason>")."""

    def __init__(self, paths: list[Path], transform: Callable, *, image_size: int, min_size: int):
        self.paths = paths
        self.transform = transform
        self.image_size = image_size
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            return i, self.transform(open_image(self.paths[i], min_size=self.min_size)), "ok"
        except ImageSkip as skip:
            return i, torch.zeros(3, self.image_size, self.image_size), f"skipped: {skip.reason}"
        except Exception as exc:  # a transform failing on a decoded image: still one row, not a crash
            return i, torch.zeros(3, self.image_size, self.image_size), f"skipped: corrupt ({type(exc).__name__})"


def collect_inputs(inputs: list[str | Path]) -> list[tuple[str, Path]]:
    """(id, file) for every image named by ``inputs``; DataError for a missing input,
    a malformed manifest, or when there is no image at all."""
    found: list[tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(_folder_images(path))
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            found.extend(_manifest_images(path))
        elif path.is_file():
            found.append((str(item), path))
        else:
            raise DataError(f"input {item} does not exist (expected an image, a folder or a .csv/.tsv manifest)")
    if not found:
        raise DataError(f"no images found in {', '.join(str(i) for i in inputs) or 'the inputs (none given)'} "
                        f"(image extensions: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def _folder_images(root: Path) -> list[tuple[str, Path]]:
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                 if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [(r, root / r) for r in rel]


def _manifest_images(path: Path) -> list[tuple[str, Path]]:
    """The images a manifest lists in its ``path`` column (relative to its folder)."""
    table = read_table(path, ("path",), expected="path (image paths relative to the manifest's folder)")
    found = []
    for line, p in zip(table.lines, table.values("path")):
        rel = safe_relpath(p, file=path, line=line)
        found.append((rel, path.parent / rel))
    return found


def predict(model: str | Path, inputs: list[str | Path], out: str | Path, *, device: str = "auto",
            batch_size: int = 64, top_k: int = 5, workers: int = 0, progress: bool = False) -> dict:
    """Classify every image of ``inputs`` with the exported run ``model``; write the CSV ``out``.

    Returns {"images", "predicted", "skipped", "out", "seconds"}.

    Raises:
        ConfigError: top_k, batch_size or workers out of range; an unavailable device.
        DataError: a missing input, a malformed manifest, no images, a model that is not ours,
            ``out`` being a folder. Nothing is written then.
    """
    start = time.perf_counter()
    for name, value, least in (("top_k", top_k, 1), ("batch_size", batch_size, 1), ("workers", workers, 0)):
        if value < least:
            raise ConfigError(f"--{name.replace('_', '-')} = {value} is invalid: expected >= {least}")
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; expected a CSV file path")
    dev = resolve_device(device, key="--device")
    items = collect_inputs(inputs)
    net, meta = load_model(model, dev)
    classes = [str(c) for c in meta["classes"]]
    try:
        pre = Preprocess.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{Path(model) / 'model.json'}: unreadable preprocessing ({exc})") from None
    k = min(top_k, len(classes))

    data = _Images([p for _, p in items], eval_transform(pre), image_size=pre.image_size, min_size=pre.resize)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    rows: list[list[str]] = [[ident, "", "", "", ""] for ident, _ in items]
    n_ok = 0
    with progress_bar(progress) as bar, torch.inference_mode():
        task = bar.add_task("predict", total=len(items))
        for index, images, status in loader:
            ok = torch.tensor([s == "ok" for s in status], dtype=torch.bool)
            for i, s in zip(index.tolist(), status):
                rows[i][4] = s
            if ok.any():
                logits = net(images[ok].to(dev, non_blocking=True))
                probs, top = logits.float().softmax(1).topk(k, dim=1)
                for i, p, t in zip(index[ok].tolist(), probs.cpu().tolist(), top.cpu().tolist()):
                    rows[i][1:4] = [classes[t[0]], f"{p[0]:.6f}",
                                    ";".join(f"{classes[c]}:{q:.4f}" for c, q in zip(t, p))]
                n_ok += int(ok.sum())
            bar.update(task, advance=len(status))

    _write_csv(out, rows)
    return {"images": len(items), "predicted": n_ok, "skipped": len(items) - n_ok, "out": str(out),
            "seconds": time.perf_counter() - start}


def _write_csv(out: Path, rows: list[list[str]]) -> None:
    """Write atomically (``mcpipe.atomic``): ``out`` is whole or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)