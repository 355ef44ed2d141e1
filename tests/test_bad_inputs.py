"""Bad inputs through the CLI, one table: each is refused with one line and the right exit code, touching nothing.

Every case in ``CASES`` builds its inputs in a fresh folder, runs one ``mcpipe``
command in-process (typer's ``CliRunner``, stderr apart from stdout) and checks:

1. the exit code: 2 for usage / configuration errors, 1 for data errors;
2. stderr is exactly one line, ``error: ...``, holding the case's distinctive
   substrings (the offending file, key or value, and a word of what was expected);
3. no traceback and no uncaught exception;
4. no file that existed before the call (inputs, earlier runs, stores) changed
   in bytes or mtime, and nothing new appeared (kNN caches and lock files aside).

Bad images are not refusals: ``mcpipe extract`` and ``mcpipe predict`` convert
or skip them and say so (``IMAGES``, at the end).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fixtures_data import make_imagefolder, make_manifest
from mcpipe.cleaner.model import Head
from mcpipe.cli import app
from mcpipe.config import load_config, to_toml
from mcpipe.extract.backbones import build_backbone
from mcpipe.extract.preprocess import preprocess_for
from mcpipe.finetune.export import export_model
from mcpipe.finetune.model import Net
from mcpipe.store.reader import open_store
from mcpipe.store.synthetic import write_synthetic_store

TINY = ("extract.backbone=resnet18", "extract.weights=none", "extract.image_size=32", "extract.batch_size=4",
        "extract.device=cpu", "extract.num_workers=0")
HEAD_FAST = ("train.epochs=1", "train.batch_size=32", "cleaner.hidden=8", "train.device=cpu",
             "cleaner.score_repeats=1", "cleaner.knn_k=3")
FINETUNE_FAST = ("data.source=imagefolder", *TINY[:3], "finetune.batch_size=6", "finetune.epochs=1",
                 "finetune.workers=0", "finetune.device=cpu", "cleaner.subset_size=2", "cleaner.hidden=8")
FINETUNE_SECTIONS = ("data", "extract", "noise", "cleaner", "finetune")
CLASSES = ["c0", "c1", "c2"]


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def invoke(*args: str):
    return CliRunner().invoke(app, [args[0], "--log-level", "error", *args[1:]])


# --------------------------------------------------------------------------- inputs shared by the cases


@dataclass(frozen=True)
class Shared:
    """Good inputs made once; cases copy what they damage."""

    root: Path
    feats: Path    # train.h5 + test.h5: 3 classes, 8-d synthetic features
    head: Path     # a finished train-head run on feats
    images: Path   # imagefolder train/test, classes c0 c1 c2
    model: Path    # an exported finetune run (resnet18, random init, 32 px, classes c0 c1 c2)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    feats = root / "feats"
    feats.mkdir()
    write_synthetic_store(feats / "train.h5", 90, 8, 3, seed=1, spread=1.0, split="train")
    write_synthetic_store(feats / "test.h5", 30, 8, 3, seed=1, spread=1.0, split="test")
    head = root / "head"
    res = invoke("train-head", "--no-progress", "--features", str(feats), "--out", str(head), *sets(*HEAD_FAST))
    assert res.exit_code == 0, res.output
    images = make_imagefolder(root / "images", classes=CLASSES, per_class=4, splits=("train", "test"), size=(24, 24))
    return Shared(root, feats, head, images, make_model(root / "model", CLASSES))


def make_model(out: Path, classes: list[str]) -> Path:
    """An exported finetune run (what ``mcpipe predict --model`` reads): resnet18, random init, 32 px."""
    out.mkdir()
    torch.manual_seed(0)
    net = Net(build_backbone("resnet18", "none", image_size=32, warn_random=False),
              Head(512, len(classes), subset_size=2, hidden=8))
    export_model(out, net, backbone="resnet18", image_size=32, classes=classes, pre=preprocess_for("resnet18", 32),
                 provenance={"weights": "none"}, metrics={})
    return out


# --------------------------------------------------------------------------- helpers that make bad files


def copy_store(shared: Shared, tmp: Path, *, test: bool = False) -> Path:
    """tmp/feats/train.h5 (and test.h5): a copy of the shared good stores."""
    out = tmp / "feats"
    out.mkdir()
    for name in ("train.h5", "test.h5") if test else ("train.h5",):
        shutil.copy2(shared.feats / name, out / name)
    return out


def mutate(path: Path, fn: Callable[[h5py.File], object]) -> Path:
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def replace_dataset(name: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def fn(f: h5py.File) -> None:
        del f[name]
        f.create_dataset(name, data=data)
    return fn


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def patched_head(shared: Shared, dest: Path, **changes) -> Path:
    """The shared head.pt with top-level keys changed (provenance given as {key: value} to merge)."""
    saved = torch.load(shared.head / "head.pt", weights_only=True)
    if "provenance" in changes:
        changes["provenance"] = {**saved["provenance"], **changes["provenance"]}
    torch.save({**saved, **changes}, dest)
    return dest


class NotAState:
    """A pickled object: weights_only loading must refuse to build it."""


def png_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def finetune_keys(root: Path, *extra: str) -> tuple[str, ...]:
    return (f"data.root={root}", *FINETUNE_FAST, *extra)


def finetune_config(*items: str) -> str:
    return to_toml(load_config(None, list(items)), FINETUNE_SECTIONS)


def fake_finetune_run(out: Path, config_text: str, checkpoint: object | bytes) -> Path:
    out.mkdir(parents=True)
    (out / "config.toml").write_text(config_text, encoding="utf-8")
    if isinstance(checkpoint, bytes):
        (out / "checkpoint.pt").write_bytes(checkpoint)
    else:
        torch.save(checkpoint, out / "checkpoint.pt")
    return out


# --------------------------------------------------------------------------- the cases

CASES = []


def case(ident: str, code: int, *expect: str):
    """Register ``fn(tmp, shared) -> CLI args`` as a case that must exit ``code`` with ``expect`` in its one line."""
    def register(fn: Callable[[Path, Shared], list[str]]):
        CASES.append(pytest.param(fn, code, expect, id=ident))
        return fn
    return register


# --- configuration: exit 2


@case("config-unknown-key", 2, "unknown key extract.bogus", "valid keys", "backbone")
def _(tmp, shared):
    return ["extract", "--out", str(tmp / "out"), *sets("extract.bogus=1")]


@case("config-unknown-key-in-file", 2, "unknown key cleaner.subset_sizes", "valid keys", "subset_size")
def _(tmp, shared):
    (tmp / "p.toml").write_text("[cleaner]\nsubset_sizes = 4\n")
    return ["train-head", "--config", str(tmp / "p.toml"), "--features", str(shared.feats), "--out", str(tmp / "r")]


@case("config-unknown-section", 2, "unknown section [cleaners]", "valid sections")
def _(tmp, shared):
    return ["train-head", "--features", str(shared.feats), "--out", str(tmp / "r"), *sets("cleaners.hidden=3")]


@case("config-wrong-type-int", 2, "train.epochs = 'many'", "expected an integer")
def _(tmp, shared):
    return ["train-head", "--features", str(shared.feats), "--out", str(tmp / "r"), *sets("train.epochs=many")]


@case("config-wrong-type-in-file", 2, "train.lr = 'fast'", "expected a number")
def _(tmp, shared):
    (tmp / "p.toml").write_text('[train]\nlr = "fast"\n')
    return ["train-head", "--config", str(tmp / "p.toml"), "--features", str(shared.feats), "--out", str(tmp / "r")]


@case("config-wrong-choice", 2, "cleaner.weighting = 'magic'", "expected one of", "relation")
def _(tmp, shared):
    return ["train-head", "--features", str(shared.feats), "--out", str(tmp / "r"), *sets("cleaner.weighting=magic")]


@case("config-noise-rate-negative", 2, "noise.rate = -0.1", "expected a number in [0, 1)")
def _(tmp, shared):
    return ["train-head", "--features", str(shared.feats), "--out", str(tmp / "r"), *sets("noise.rate=-0.1")]


@case("config-noise-rate-one", 2, "noise.rate = 1.0", "expected a number in [0, 1)")
def _(tmp, shared):
    return ["train-head", "--features", str(shared.feats), "--out", str(tmp / "r"),
            *sets("noise.kind=symmetric", "noise.rate=1.0")]


@case("config-subset-size-zero", 2, "cleaner.subset_size = 0", "expected an integer >= 1")
def _(tmp, shared):
    return ["train-head", "--features", str(shared.feats), "--out", str(tmp / "r"), *sets("cleaner.subset_size=0")]


@case("config-limit-negative", 2, "data.limit = -5", "expected an integer >= 0")
def _(tmp, shared):
    return ["extract", "--out", str(tmp / "out"), *sets("data.limit=-5")]


@case("config-file-missing", 2, "nope.toml", "does not exist")
def _(tmp, shared):
    return ["extract", "--config", str(tmp / "nope.toml"), "--out", str(tmp / "out")]


@case("config-file-not-toml", 2, "bad.toml", "not valid TOML")
def _(tmp, shared):
    (tmp / "bad.toml").write_text("[data\nroot = 'x'\n")
    return ["extract", "--config", str(tmp / "bad.toml"), "--out", str(tmp / "out")]


@case("config-set-syntax", 2, "--set 'datalimit'", "expected section.key=value")
def _(tmp, shared):
    return ["extract", "--out", str(tmp / "out"), "--set", "datalimit"]


@case("config-log-level", 2, "--log-level 'loud'", "expected debug, info")
def _(tmp, shared):
    return ["inspect", str(shared.feats / "train.h5"), "--log-level", "loud"]


@case("weights-file-pickles-an-object", 1, "module.pth", "not a plain state_dict", "weights_only")
def _(tmp, shared):
    torch.save(torch.nn.Linear(2, 2), tmp / "module.pth")
    return ["extract", "--out", str(tmp / "out"),
            *sets(*TINY, f"extract.weights={tmp / 'module.pth'}", "data.source=imagefolder",
                  f"data.root={shared.images}")]


@case("weights-file-truncated", 1, "cut.pth", "not a torch checkpoint")
def _(tmp, shared):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp / "full.pth")
    (tmp / "cut.pth").write_bytes((tmp / "full.pth").read_bytes()[:300])
    return ["extract", "--out", str(tmp / "out"),
            *sets(*TINY, f"extract.weights={tmp / 'cut.pth'}", "data.source=imagefolder",
                  f"data.root={shared.images}")]


# --- command line (click's own usage errors): exit 2, one line too


@case("usage-unknown-option", 2, "No such option: --bogus", "see 'mcpipe train-head --help'")
def _(tmp, shared):
    return ["train-head", "--bogus", "x", "--features", str(shared.feats), "--out", str(tmp / "r")]


@case("usage-unknown-command", 2, "No such command 'train-heads'", "see 'mcpipe --help'")
def _(tmp, shared):
    return ["train-heads", "--features", str(shared.feats)]


@case("usage-missing-argument", 2, "Missing argument 'run'", "see 'mcpipe report --help'")
def _(tmp, shared):
    return ["report"]


@case("usage-not-an-integer", 2, "--top-k", "valid integer")
def _(tmp, shared):
    return ["predict", str(tmp / "model"), str(shared.root), "--top-k", "many"]


# --- data sets: exit 1


@case("data-root-missing", 1, "data.root", "nowhere", "not a folder")
def _(tmp, shared):
    return ["extract", "--out", str(tmp / "out"),
            *sets(*TINY, "data.source=imagefolder", f"data.root={tmp / 'nowhere'}")]


@case("data-set-empty", 1, "imagefolder split 'train'", "has no images")
def _(tmp, shared):
    for name in CLASSES:
        (tmp / "data" / name).mkdir(parents=True)
    (tmp / "data" / "c0" / "notes.txt").write_text("not an image")
    return ["extract", "--out", str(tmp / "out"), *sets(*TINY, "data.source=imagefolder", f"data.root={tmp / 'data'}")]


def manifest_extract(tmp: Path) -> list[str]:
    return ["extract", "--out", str(tmp / "out"), *sets(*TINY, "data.source=manifest", f"data.root={tmp / 'data'}")]


@case("manifest-missing-column", 1, "train.csv line 1", "lacks the column(s) label", "expected path, label")
def _(tmp, shared):
    make_manifest(tmp / "data", {"train": [("a.png", "cat"), ("b.png", "dog")]}, header=("path", "class"))
    return manifest_extract(tmp)


@case("manifest-non-integer-label", 1, "train.csv line 4", "'2.5'", "expected an integer")
def _(tmp, shared):
    make_manifest(tmp / "data", {"train": [("a.png", "0", ""), ("b.png", "1", ""), ("c.png", "2.5", ""),
                                           ("d.png", "1", "")]})
    return manifest_extract(tmp)


@case("manifest-label-not-in-classes", 1, "train.csv line 3", "label 'bird'", "not one of the 2 classes")
def _(tmp, shared):
    make_manifest(tmp / "data", {"train": [("a.png", "cat", ""), ("b.png", "bird", "")]}, classes=["cat", "dog"])
    return manifest_extract(tmp)


@case("manifest-duplicate-ids", 1, "'images/a.png' appears more than once")
def _(tmp, shared):
    make_manifest(tmp / "data", {"train": [("images/a.png", "cat", ""), ("images/b.png", "dog", ""),
                                           ("./images//a.png", "dog", "")]})
    return manifest_extract(tmp)


@case("manifest-path-escapes-root", 1, "train.csv line 3", "'../secret.png'", "leaves the data root")
def _(tmp, shared):
    make_manifest(tmp / "data", {"train": [("a.png", "cat", ""), ("../secret.png", "dog", "")]})
    Image.new("RGB", (8, 8)).save(tmp / "secret.png")
    return manifest_extract(tmp)


@case("manifest-short-row", 1, "train.csv line 3", "1 fields, expected at least 2")
def _(tmp, shared):
    make_manifest(tmp / "data", {"train": [("a.png", "cat"), ("b.png",)]}, header=("path", "label"))
    return manifest_extract(tmp)


# --- feature stores: exit 1


@case("store-not-hdf5", 1, "text.h5", "not an HDF5 file")
def _(tmp, shared):
    (tmp / "text.h5").write_text("path,label\n")
    return ["inspect", str(tmp / "text.h5")]


@case("store-truncated-file", 1, "train.h5", "cannot be read")
def _(tmp, shared):
    feats = copy_store(shared, tmp)
    data = (feats / "train.h5").read_bytes()
    (feats / "train.h5").write_bytes(data[: len(data) // 2])
    return ["train-head", "--features", str(feats), "--out", str(tmp / "r"), *sets(*HEAD_FAST)]


@case("store-missing-dataset", 1, "train.h5", "lacks dataset(s) labels", "written by mcpipe extract")
def _(tmp, shared):
    mutate(copy_store(shared, tmp) / "train.h5", lambda f: f.__delitem__("labels"))
    return ["inspect", str(tmp / "feats" / "train.h5")]


@case("store-other-hdf5", 1, "other.h5", "lacks dataset(s) features")
def _(tmp, shared):
    with h5py.File(tmp / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    return ["inspect", str(tmp / "other.h5")]


@case("store-wrong-schema-version", 1, "train.h5", "schema version 7", "reads version 1")
def _(tmp, shared):
    feats = copy_store(shared, tmp)
    mutate(feats / "train.h5", lambda f: f.attrs.__setitem__("schema_version", 7))
    return ["train-head", "--features", str(feats), "--out", str(tmp / "r"), *sets(*HEAD_FAST)]


@case("store-labels-outside-classes", 1, "train.h5", "labels in [0, 9] but 3 classes")
def _(tmp, shared):
    feats = copy_store(shared, tmp)
    mutate(feats / "train.h5", lambda f: f["labels"].__setitem__(4, 9))
    return ["inspect", str(feats / "train.h5")]


@case("store-nan-features", 1, "train.h5", "NaN or infinite features", "row 5")
def _(tmp, shared):
    feats = copy_store(shared, tmp)
    mutate(feats / "train.h5", lambda f: f["features"].__setitem__((5, 2), np.nan))
    return ["train-head", "--features", str(feats), "--out", str(tmp / "r"), *sets(*HEAD_FAST)]


@case("store-inf-features", 1, "train.h5", "NaN or infinite features", "row 7")
def _(tmp, shared):
    feats = copy_store(shared, tmp)
    mutate(feats / "train.h5", lambda f: f["features"].__setitem__((7, 0), np.inf))
    return ["inspect", str(feats / "train.h5")]


@case("store-incomplete-train-head", 1, "train.h5", "incomplete: 89 of 90 rows", "mcpipe extract command again")
def _(tmp, shared):
    feats = copy_store(shared, tmp)
    mutate(feats / "train.h5", lambda f: f["written"].__setitem__(3, False))
    return ["train-head", "--features", str(feats), "--out", str(tmp / "r"), *sets(*HEAD_FAST)]


@case("store-incomplete-inspect-require-complete", 1, "train.h5", "incomplete: 0 of 90 rows")
def _(tmp, shared):
    feats = copy_store(shared, tmp)
    mutate(feats / "train.h5", lambda f: (f["written"].__setitem__(slice(None), False),
                                          f.attrs.__setitem__("complete", False)))
    return ["inspect", "--require-complete", str(feats / "train.h5")]


@case("store-train-test-class-count", 1, "train.h5 and", "test.h5 differ in classes")
def _(tmp, shared):
    feats = copy_store(shared, tmp)
    write_synthetic_store(feats / "test.h5", 30, 8, 4, seed=1, split="test")
    return ["train-head", "--features", str(feats), "--out", str(tmp / "r"), *sets(*HEAD_FAST)]


@case("store-train-test-feature-dim", 1, "differ in feature dimension", "8 vs 12")
def _(tmp, shared):
    feats = copy_store(shared, tmp)
    write_synthetic_store(feats / "test.h5", 30, 12, 3, seed=1, split="test")
    return ["train-head", "--features", str(feats), "--out", str(tmp / "r"), *sets(*HEAD_FAST)]


@case("store-is-a-folder", 1, "is a folder", "train.h5")
def _(tmp, shared):
    return ["inspect", str(shared.feats)]


# --- heads, checkpoints and models: exit 1 (2 for a changed config)


def finetune_with_head(tmp: Path, shared: Shared, head: Path) -> list[str]:
    return ["finetune", "--no-progress", "--out", str(tmp / "run"), "--head", str(head),
            *sets(*finetune_keys(shared.images))]


@case("head-not-ours", 1, "other.pt", "not an mcpipe head")
def _(tmp, shared):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "other.pt")
    return finetune_with_head(tmp, shared, tmp / "other.pt")


@case("head-truncated", 1, "cut.pt", "cannot be read as an mcpipe head")
def _(tmp, shared):
    (tmp / "cut.pt").write_bytes((shared.head / "head.pt").read_bytes()[:2000])
    return finetune_with_head(tmp, shared, tmp / "cut.pt")


@case("head-pickles-an-object", 1, "pickled.pt", "cannot be read as an mcpipe head", "weights_only")
def _(tmp, shared):
    patched_head(shared, tmp / "pickled.pt", extra=NotAState())
    return finetune_with_head(tmp, shared, tmp / "pickled.pt")


@case("head-feature-dim-mismatch", 1, "head.pt", "feature dimension is 8 but this finetune's is 512")
def _(tmp, shared):
    run = copy_run(shared.head, tmp / "head")
    patched_head(shared, run / "head.pt", provenance={"backbone": "resnet18"})
    return finetune_with_head(tmp, shared, run)


@case("head-class-count-mismatch", 1, "four.pt", "class count is 4 but this finetune's is 3")
def _(tmp, shared):
    patched_head(shared, tmp / "four.pt", provenance={"backbone": "resnet18"}, feature_dim=512,
                 classes=[*CLASSES, "c3"])
    return finetune_with_head(tmp, shared, tmp / "four.pt")


@case("head-format-but-not-a-head", 1, "forged.pt", "not an mcpipe head")
def _(tmp, shared):
    torch.save({"format": "mcpipe-head", "classes": CLASSES}, tmp / "forged.pt")
    return finetune_with_head(tmp, shared, tmp / "forged.pt")


@case("head-run-without-head", 1, "no head.pt")
def _(tmp, shared):
    (tmp / "empty_run").mkdir()
    return finetune_with_head(tmp, shared, tmp / "empty_run")


def predict_with(tmp: Path, shared: Shared, model: Path) -> list[str]:
    return ["predict", "--no-progress", "--device", "cpu", "--model", str(model), "--out", str(tmp / "pred.csv"),
            str(shared.images / "test")]


@case("model-weights-truncated", 1, "model.pt", "cannot be loaded as a plain state_dict")
def _(tmp, shared):
    model = copy_run(shared.model, tmp / "model")
    data = (model / "model.pt").read_bytes()
    (model / "model.pt").write_bytes(data[: len(data) // 3])
    return predict_with(tmp, shared, model)


@case("model-weights-pickle-an-object", 1, "model.pt", "cannot be loaded as a plain state_dict")
def _(tmp, shared):
    model = copy_run(shared.model, tmp / "model")
    torch.save({"fc.weight": NotAState()}, model / "model.pt")
    return predict_with(tmp, shared, model)


@case("model-json-not-ours", 1, "model.json", "not an mcpipe model description", "mcpipe-model")
def _(tmp, shared):
    model = copy_run(shared.model, tmp / "model")
    (model / "model.json").write_text(json.dumps({"format": "keras", "layers": []}))
    return predict_with(tmp, shared, model)


@case("model-feature-dim-mismatch", 1, "model.json and model.pt do not describe one network", "512-d",
      "the head takes 8")
def _(tmp, shared):
    model = copy_run(shared.model, tmp / "model")
    meta = json.loads((model / "model.json").read_text())
    meta["head"]["feature_dim"] = 8  # the head of an 8-d store on a 512-d backbone
    (model / "model.json").write_text(json.dumps(meta))
    return predict_with(tmp, shared, model)


@case("predict-input-missing", 1, "input", "gone.png", "does not exist")
def _(tmp, shared):
    return ["predict", "--model", str(shared.model), "--out", str(tmp / "pred.csv"), str(tmp / "gone.png")]


@case("train-head-resume-changed-config", 2, "--resume", "config differs", "config.toml")
def _(tmp, shared):
    run = copy_run(shared.head, tmp / "run")
    return ["train-head", "--features", str(shared.feats), "--out", str(run), "--resume",
            *sets(*HEAD_FAST, "train.lr=0.5")]


@case("train-head-resume-checkpoint-truncated", 1, "checkpoint.pt", "cannot be read")
def _(tmp, shared):
    run = copy_run(shared.head, tmp / "run")
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return ["train-head", "--features", str(shared.feats), "--out", str(run), "--resume", *sets(*HEAD_FAST)]


@case("train-head-resume-checkpoint-not-ours", 1, "checkpoint.pt", "not an mcpipe train-head checkpoint")
def _(tmp, shared):
    run = copy_run(shared.head, tmp / "run")
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 0}, run / "checkpoint.pt")
    return ["train-head", "--features", str(shared.feats), "--out", str(run), "--resume", *sets(*HEAD_FAST)]


@case("train-head-resume-checkpoint-pickles-an-object", 1, "checkpoint.pt", "cannot be read", "weights_only")
def _(tmp, shared):
    run = copy_run(shared.head, tmp / "run")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "history": NotAState()}, run / "checkpoint.pt")
    return ["train-head", "--features", str(shared.feats), "--out", str(run), "--resume", *sets(*HEAD_FAST)]


@case("train-head-resume-store-class-count-changed", 1, "checkpoint.pt", "does not fit", "classifier.weight")
def _(tmp, shared):
    """Same config, but the features folder now holds 4 classes: the 3-class checkpoint cannot continue."""
    run = copy_run(shared.head, tmp / "run")
    feats = tmp / "feats4"
    feats.mkdir()
    write_synthetic_store(feats / "train.h5", 90, 8, 4, seed=1, split="train")
    return ["train-head", "--features", str(feats), "--out", str(run), "--resume", *sets(*HEAD_FAST)]


@case("finetune-resume-changed-config", 2, "--resume", "config differs", "config.toml")
def _(tmp, shared):
    keys = finetune_keys(shared.images)
    out = fake_finetune_run(tmp / "run", finetune_config(*keys), {"format": "mcpipe-finetune-checkpoint"})
    return ["finetune", "--no-progress", "--out", str(out), "--resume", *sets(*keys, "finetune.lr=0.5")]


@case("finetune-resume-checkpoint-not-ours", 1, "checkpoint.pt", "not an mcpipe finetune checkpoint")
def _(tmp, shared):
    keys = finetune_keys(shared.images)
    out = fake_finetune_run(tmp / "run", finetune_config(*keys), {"model": {}, "epoch": 1})
    return ["finetune", "--no-progress", "--out", str(out), "--resume", *sets(*keys)]


@case("finetune-resume-checkpoint-truncated", 1, "checkpoint.pt", "cannot be read")
def _(tmp, shared):
    keys = finetune_keys(shared.images)
    buf = io.BytesIO()
    torch.save({"format": "mcpipe-finetune-checkpoint", "model": {"w": torch.zeros(1000)}}, buf)
    out = fake_finetune_run(tmp / "run", finetune_config(*keys), buf.getvalue()[:500])
    return ["finetune", "--no-progress", "--out", str(out), "--resume", *sets(*keys)]


@case("finetune-resume-checkpoint-does-not-fit", 1, "checkpoint.pt does not fit", "Unexpected key", "--overwrite")
def _(tmp, shared):
    """A checkpoint in our format whose model is another network (the data's classes changed since, say)."""
    keys = finetune_keys(shared.images)
    text = finetune_config(*keys)
    ckpt = {"format": "mcpipe-finetune-checkpoint", "version": 2, "model": {"other.weight": torch.zeros(2)},
            "optimizer": {}, "scheduler": {}, "epoch": 1, "step": 0, "phase": "cleaner", "history": [], "start": None,
            "seconds": 1.0, "replaced": 0, "partial": None, "partial_seconds": 0.0, "world": 1, "config": text}
    out = fake_finetune_run(tmp / "run", text, ckpt)
    return ["finetune", "--no-progress", "--out", str(out), "--resume", *sets(*keys)]


@case("finetune-resume-without-checkpoint", 1, "--resume", "no checkpoint.pt")
def _(tmp, shared):
    (tmp / "run").mkdir()
    return ["finetune", "--no-progress", "--out", str(tmp / "run"), "--resume", *sets(*finetune_keys(shared.images))]


# --- an output folder that holds something else: refused without --overwrite


@case("train-head-out-holds-a-run", 1, "already holds a run", "--overwrite")
def _(tmp, shared):
    run = copy_run(shared.head, tmp / "run")
    return ["train-head", "--features", str(shared.feats), "--out", str(run), *sets(*HEAD_FAST, "train.lr=0.5")]


@case("finetune-out-holds-a-run", 1, "already holds a run", "model.pt", "--overwrite")
def _(tmp, shared):
    copy_run(shared.model, tmp / "run")
    return ["finetune", "--no-progress", "--out", str(tmp / "run"), *sets(*finetune_keys(shared.images))]


@case("extract-out-holds-other-stores", 1, "train.h5", "other data", "--overwrite")
def _(tmp, shared):
    copy_run(shared.feats, tmp / "out")
    return ["extract", "--no-progress", "--out", str(tmp / "out"),
            *sets(*TINY, "data.source=imagefolder", f"data.root={shared.images}")]


@case("extract-out-holds-an-unreadable-store", 1, "train.h5", "not a readable feature store", "--overwrite")
def _(tmp, shared):
    (tmp / "out").mkdir()
    data = (shared.feats / "train.h5").read_bytes()
    (tmp / "out" / "train.h5").write_bytes(data[: len(data) // 2])
    return ["extract", "--no-progress", "--out", str(tmp / "out"),
            *sets(*TINY, "data.source=imagefolder", f"data.root={shared.images}")]


@case("run-out-is-a-file", 1, "--out", "is a file, not a run folder")
def _(tmp, shared):
    (tmp / "run").write_text("mine")
    return ["train-head", "--features", str(shared.feats), "--out", str(tmp / "run"), *sets(*HEAD_FAST)]


@case("predict-out-is-a-folder", 1, "--out", "is a folder", "CSV file")
def _(tmp, shared):
    (tmp / "pred.csv").mkdir()
    (tmp / "pred.csv" / "keep.txt").write_text("mine")
    return ["predict", "--model", str(shared.model), "--out", str(tmp / "pred.csv"), str(shared.images / "test")]


# --------------------------------------------------------------------------- running a case

def _bookkeeping(name: str) -> bool:
    """kNN caches a command may add beside a store it reads; lock files (``.lock``, ``.<name>.lock``)."""
    return ".knn-k" in name or (name.startswith(".") and name.endswith(".lock"))


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """path -> (sha256, mtime_ns) of every file under ``roots`` but bookkeeping files."""
    files = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not _bookkeeping(p.name):
                files[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return files


@pytest.mark.parametrize("build, code, expect", CASES)
def test_refused_with_one_line(build, code, expect, shared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./pipeline.toml, and a stray relative output would show up below
    args = build(tmp_path, shared)
    before = snapshot(tmp_path, shared.root)
    res = invoke(*args)

    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"uncaught {type(res.exception).__name__}: {res.exception}")
    assert "Traceback" not in res.output
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for text in expect:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert res.stdout == ""
    assert snapshot(tmp_path, shared.root) == before, "a refused command changed or added files"


def test_no_arguments_prints_the_help():
    res = CliRunner().invoke(app, [])
    assert res.exit_code == 0 and "Usage: mcpipe" in res.stdout and "train-head" in res.stdout
    assert res.stderr == ""


def test_overwrite_replaces_an_unreadable_store(shared, tmp_path):
    """What the refusal above advises works: an unreadable store is no lock (an HDF5 "sblock" message is not)."""
    (tmp_path / "out").mkdir()
    data = (shared.feats / "train.h5").read_bytes()
    (tmp_path / "out" / "train.h5").write_bytes(data[: len(data) // 2])
    res = invoke("extract", "--no-progress", "--overwrite", "--out", str(tmp_path / "out"),
                 *sets(*TINY, "data.source=imagefolder", f"data.root={shared.images}", 'data.splits=["train"]'))
    assert res.exit_code == 0, res.output
    assert "train: 12 rows" in res.stdout and "(complete)" in res.stdout


def test_every_torch_load_is_weights_only():
    """No checkpoint, head or weights file is ever unpickled with arbitrary objects."""
    repo = Path(__file__).resolve().parents[1]
    calls = []
    for folder in ("mcpipe", "store", "extract", "cleaner", "finetune"):
        for path in (repo / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for start in [i for i in range(len(text)) if text.startswith("torch.load(", i)]:
                call = text[start:text.index(")", start) + 1]
                calls.append((path.name, call))
                assert "weights_only=True" in call, f"{path}: {call}"
            assert "allow_pickle=True" not in text, path
    assert len(calls) >= 4, calls  # extract weights, head, finetune checkpoint, model, train-head checkpoint


# --------------------------------------------------------------------------- bad images: converted or skipped


def _noise_rgb(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png_bytes(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def _palette() -> Image.Image:
    img = Image.fromarray(_noise_rgb(3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert img.mode == "P"
    return img


# file name -> (bytes, outcome): "ok" = converted to RGB and used, else the skip reason
IMAGES = {
    "corrupt.jpg": (lambda: np.random.default_rng(7).bytes(2000), "corrupt"),
    "truncated.png": (lambda: _png_bytes(Image.fromarray(_noise_rgb(1)))[:300], "truncated"),
    "zero_bytes.png": (lambda: b"", "empty"),
    "text.png": (lambda: b"this is not an image\n", "corrupt"),
    "bomb_30000x30000.png": (lambda: png_claiming(30000, 30000), "too_large"),
    "cmyk.jpg": (lambda: _png_bytes(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", quality=95), "ok"),
    "gray_16bit.png": (lambda: _png_bytes(Image.fromarray(np.full((24, 24), 40000, np.uint16))), "ok"),
    "rgba.png": (lambda: _png_bytes(Image.fromarray(np.dstack([_noise_rgb(2), np.full((24, 24), 128, np.uint8)]))),
                 "ok"),
    "palette.png": (lambda: _png_bytes(_palette()), "ok"),
}
SKIPPED = {name: outcome for name, (_, outcome) in IMAGES.items() if outcome != "ok"}


@pytest.fixture(scope="module")
def bad_image_runs(tmp_path_factory):
    """One imagefolder with every kind of bad image in class c1; extract it and predict it, once each."""
    root = tmp_path_factory.mktemp("badimg")
    data = make_imagefolder(root / "data", classes=["c0", "c1"], per_class=2, size=(24, 24))
    for name, (make, _) in IMAGES.items():
        (data / "c1" / name).write_bytes(make())
    assert Image.open(data / "c1" / "gray_16bit.png").mode.startswith("I")
    assert Image.open(data / "c1" / "cmyk.jpg").mode == "CMYK" and Image.open(data / "c1" / "rgba.png").mode == "RGBA"
    extracted = invoke("extract", "--no-progress", "--out", str(root / "feats"),
                       *sets(*TINY, "data.source=imagefolder", f"data.root={data}"))
    inspected = invoke("inspect", str(root / "feats" / "train.h5"))
    model = make_model(root / "model", ["c0", "c1"])
    predicted = invoke("predict", "--no-progress", "--device", "cpu", "--batch-size", "4", "--model", str(model),
                       "--out", str(root / "pred.csv"), str(data))
    return root, extracted, inspected, predicted


def _clean_run(res) -> None:
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output


def test_extract_reports_every_skipped_image(bad_image_runs):
    root, extracted, inspected, _ = bad_image_runs
    _clean_run(extracted)
    why = ", ".join(f"{n} {r}" for r, n in sorted(Counter(SKIPPED.values()).items()))
    assert f"train: {4 + len(IMAGES)} rows" in extracted.stdout and "(complete)" in extracted.stdout
    assert f"{len(SKIPPED)} skipped ({why})" in extracted.stdout, extracted.stdout
    _clean_run(inspected)
    assert f"{len(SKIPPED)} skipped" in inspected.stdout
    for name, reason in SKIPPED.items():  # inspect names every skipped image and why
        assert any(reason in line and f"c1/{name}" in line for line in inspected.stdout.splitlines()), name


@pytest.mark.parametrize("name", list(IMAGES))
def test_bad_image_in_extract(bad_image_runs, name):
    root, extracted, _, _ = bad_image_runs
    _clean_run(extracted)
    store = open_store(root / "feats" / "train.h5")
    ident = f"c1/{name}"
    if IMAGES[name][1] == "ok":  # converted to RGB and extracted
        assert ident in store.ids and ident not in dict(store.skipped)
        assert np.isfinite(store.features[store.ids.index(ident)].astype(np.float32)).all()
    else:  # a row recorded as skipped, with its reason, and left out of what the reader returns
        assert dict(store.skipped)[ident] == IMAGES[name][1] and ident not in store.ids


@pytest.mark.parametrize("name", list(IMAGES))
def test_bad_image_in_predict(bad_image_runs, name):
    root, _, _, predicted = bad_image_runs
    _clean_run(predicted)
    assert f"{4 + len(IMAGES) - len(SKIPPED)} of {4 + len(IMAGES)} images classified, {len(SKIPPED)} skipped" \
        in predicted.stdout, predicted.stdout
    with open(root / "pred.csv", newline="", encoding="utf-8") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    row = rows[f"c1/{name}"]
    outcome = IMAGES[name][1]
    if outcome == "ok":
        assert row["status"] == "ok" and row["predicted"] in ("c0", "c1")
    else:
        assert row["status"] == f"skipped: {outcome}" and row["predicted"] == ""
