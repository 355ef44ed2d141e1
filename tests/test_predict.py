"""mcpipe predict: files, folders and manifests in, one CSV row per image out; bad inputs refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcpipe.cleaner.model import Head
from mcpipe.errors import ConfigError, DataError
from mcpipe.extract.backbones import build_backbone
from mcpipe.extract.images import open_image
from mcpipe.extract.preprocess import Preprocess, eval_transform, preprocess_for
from mcpipe.finetune.export import export_model, load_model
from mcpipe.finetune.model import Net
from mcpipe.finetune.predict import COLUMNS, predict

CLASSES = ["cat", "dog", "fox"]


class NotATensor:
    """Pickled into a model.pt: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.x = 1


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    net = Net(build_backbone("resnet18", "none", image_size=32, warn_random=False),
              Head(512, len(CLASSES), subset_size=2, hidden=8))
    export_model(out, net, backbone="resnet18", image_size=32, classes=CLASSES, pre=preprocess_for("resnet18", 32),
                 provenance={"weights": "none"}, metrics={})
    return out


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    _image(root / "a.png", 0)
    _image(root / "b.JPG", 1, (48, 40))
    _image(root / "sub" / "c.png", 2)
    _image(root / "sub" / "deep" / "d.jpeg", 3)
    (root / "notes.txt").write_text("not an image")
    return root


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def _top_k(cell: str) -> list[tuple[str, float]]:
    return [(c, float(p)) for c, p in (x.rsplit(":", 1) for x in cell.split(";"))]


def test_files_folder_and_manifest(run, data, tmp_path):
    (data / "list.csv").write_text("label,path\nx,a.png\ny,sub/c.png\n\n")
    (data / "list.tsv").write_text("path\nsub/deep/d.jpeg\n")
    single = data / "b.JPG"
    out = tmp_path / "results" / "pred.csv"
    summary = predict(run, [data, str(single), data / "list.csv", data / "list.tsv"], out, device="cpu",
                      batch_size=3, top_k=2)
    rows = _read(out)
    ids = [r["id"] for r in rows]
    assert ids == ["a.png", "b.JPG", "sub/c.png", "sub/deep/d.jpeg", str(single), "a.png", "sub/c.png",
                   "sub/deep/d.jpeg"]
    assert summary["images"] == summary["predicted"] == 8 and summary["skipped"] == 0
    assert summary["out"] == str(out) and summary["seconds"] >= 0
    for r in rows:
        assert r["status"] == "ok"
        top = _top_k(r["top_k"])
        assert len(top) == 2 and all(c in CLASSES for c, _ in top)
        probs = [p for _, p in top]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert r["predicted"] == top[0][0]
        assert 0 <= float(r["probability"]) <= 1 and abs(float(r["probability"]) - top[0][1]) < 1e-4
    # the same image gives the same row however it is named
    assert rows[0]["top_k"] == rows[5]["top_k"] and rows[3]["probability"] == rows[7]["probability"]

    net, meta = load_model(run)
    pre = Preprocess.from_dict(meta["preprocessing"])
    x = eval_transform(pre)(open_image(data / "sub" / "c.png", min_size=pre.resize))
    with torch.inference_mode():
        expected = net(x[None]).softmax(1)[0]
    k = int(expected.argmax())
    assert rows[2]["predicted"] == CLASSES[k]
    assert float(rows[2]["probability"]) == pytest.approx(float(expected[k]), abs=1e-5)
    by_class = dict(_top_k(rows[2]["top_k"]))
    for c, p in by_class.items():
        assert p == pytest.approx(float(expected[CLASSES.index(c)]), abs=1e-4)

    # top_k above the number of classes gives every class
    predict(run, [single], out, device="cpu", top_k=10)
    assert len(_top_k(_read(out)[0]["top_k"])) == len(CLASSES)


def test_bad_images_are_skipped_rows(run, data, tmp_path):
    (data / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (data / "empty.png").write_bytes(b"")
    (data / "list.csv").write_text("path\na.png\nmissing.png\n")
    out = tmp_path / "pred.csv"
    summary = predict(run, [data], out, device="cpu", batch_size=2)
    rows = {r["id"]: r for r in _read(out)}
    assert summary == {**summary, "images": 6, "predicted": 4, "skipped": 2}
    assert rows["corrupt.jpg"]["status"] == "skipped: corrupt"
    assert rows["empty.png"]["status"] == "skipped: empty"
    for bad in ("corrupt.jpg", "empty.png"):
        assert rows[bad]["predicted"] == rows[bad]["probability"] == rows[bad]["top_k"] == ""
    assert rows["a.png"]["status"] == "ok"

    # a batch of only bad images, and a listed image that is not there
    predict(run, [data / "corrupt.jpg", data / "empty.png", data / "list.csv"], out, device="cpu", batch_size=2)
    assert [r["status"] for r in _read(out)] == ["skipped: corrupt", "skipped: empty", "ok", "skipped: missing"]


def _model_copy(run: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("model.json", "model.pt"):
        (dest / name).write_bytes((run / name).read_bytes())
    return dest


def test_refusals_write_nothing(run, data, tmp_path):
    out = tmp_path / "out" / "pred.csv"
    image = data / "a.png"

    no_json = _model_copy(run, tmp_path / "no_json")
    (no_json / "model.json").unlink()
    other = _model_copy(run, tmp_path / "other")
    (other / "model.json").write_text(json.dumps({**json.loads((run / "model.json").read_text()),
                                                  "format": "something-else"}))
    garbage = _model_copy(run, tmp_path / "garbage")
    (garbage / "model.pt").write_bytes(b"\x00garbage bytes, not a torch file" * 20)
    pickled = _model_copy(run, tmp_path / "pickled")
    torch.save({"weight": NotATensor()}, pickled / "model.pt")
    for model, named in ((no_json, "model.json"), (other, "model.json"), (garbage, "model.pt"),
                         (pickled, "model.pt"), (tmp_path / "nowhere", "nowhere")):
        with pytest.raises(DataError, match=named) as info:
            predict(model, [image], out, device="cpu")
        assert str(model) in str(info.value)

    with pytest.raises(DataError, match="does-not-exist.png"):
        predict(run, [image, data / "does-not-exist.png"], out, device="cpu")
    (data / "escape.csv").write_text("path\na.png\n../outside.png\n")
    with pytest.raises(DataError, match=r"escape\.csv line 3: path '\.\./outside\.png'"):
        predict(run, [data / "escape.csv"], out, device="cpu")
    (data / "nopath.tsv").write_text("file\ta.png\n")
    with pytest.raises(DataError, match="nopath.tsv line 1"):
        predict(run, [data / "nopath.tsv"], out, device="cpu")
    empty = tmp_path / "empty_folder"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        predict(run, [empty], out, device="cpu")
    for bad in ({"top_k": 0}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            predict(run, [image], out, device="cpu", **bad)
    assert not out.exists() and not out.parent.exists()
