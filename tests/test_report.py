"""mcpipe report: every figure and the page for a real small sweep, a head run and a finetune run; refusals."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, invoke, sets, sweep_runs
from fixtures_data import make_imagefolder
from mcpipe.report.collect import read_sweep
from mcpipe.report.run import pivot
from mcpipe.rundir import read_confusion

TINY = (*TINY, "extract.batch_size=8")  # (a later key wins)
HEAD = ["train.epochs=3", "train.lr_step=2", "train.batch_size=24", "cleaner.hidden=16", "train.device=cpu",
        "cleaner.score_repeats=2", "cleaner.knn_k=3", "noise.kind=symmetric"]
CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report") / "images"
    make_imagefolder(root, classes=CLASSES, per_class=12, splits=("train", "test"), size=(20, 20))
    return root


@pytest.fixture(scope="module")
def sweep(data) -> Path:
    base = data.parent
    features = base / "features"
    res = invoke("extract", "--out", str(features), "--log-level", "warning",
                 *sets(*TINY, "data.source=imagefolder", f"data.root={data}"))
    assert res.exit_code == 0, res.output
    res = invoke("sweep", "--features", str(features), "--out", str(base / "sweep"), "--log-level", "warning",
                 "--no-progress", *sets(*HEAD, "sweep.noise.rate=[0.0, 0.4]", "sweep.cleaner.subset_size=[1, 2]"))
    assert res.exit_code == 0, res.output
    return base / "sweep"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 200, (path, img.size)
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5, f"{path} is blank"


def referenced(index: Path) -> set[str]:
    return set(re.findall(r'<img src="([^"]+)"', index.read_text()))


@pytest.mark.slow
def test_sweep_report_writes_every_figure(sweep):
    res = invoke("report", str(sweep), "--log-level", "warning")
    assert res.exit_code == 0, res.output
    out = sweep / "report"
    assert_png(out / "accuracy_vs_noise.png")
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "report")
    assert len(runs) == 4
    for run in runs:
        for name in ("training_curves.png", "confusion.png", "suspects.png"):
            assert_png(out / run / name)
        if "rate=0.4" in run:  # flipped labels exist: score histograms (alpha only where N > 1)
            assert_png(out / run / "scores.png")
        else:
            assert not (out / run / "scores.png").exists()
    index = out / "index.html"
    assert index.stat().st_size > 1000
    pngs = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert referenced(index) == pngs  # the page shows every figure and nothing that is missing
    assert "open " + str(index) in res.output.replace("\n", "")
    # the printed pivot: one row per noise rate, one column per N, the runs' own numbers
    assert "noise.rate" in res.output and "N = 1 (softmax baseline)" in res.output and "N = 2" in res.output
    metrics = json.loads((sweep_runs(sweep)[("0.4", "2")] / "metrics.json").read_text())
    assert f"{metrics['test_accuracy']:.4f} ({metrics['noise_detection_auroc']:.3f})" in res.output


def test_pivot_puts_each_run_in_its_cell(sweep):
    table = pivot(read_sweep(sweep))
    assert table.header[0] == "noise.rate" and len(table.rows) == 2 and [r[0] for r in table.rows] == ["0.0", "0.4"]
    assert table.header[1].startswith("N = 1") and table.header[2].startswith("N = 2")
    m = json.loads((sweep_runs(sweep)[("0.4", "1")] / "metrics.json").read_text())
    assert table.rows[1][1].startswith(f"{m['test_accuracy']:.4f}")


def test_metrics_carry_their_format_version_and_a_newer_one_is_refused(sweep, tmp_path):
    run = sweep_runs(sweep)[("0.4", "2")]
    assert json.loads((run / "metrics.json").read_text())["format_version"] == 1
    newer = tmp_path / "newer"
    shutil.copytree(run, newer)
    m = json.loads((newer / "metrics.json").read_text())
    (newer / "metrics.json").write_text(json.dumps({**m, "format_version": 2}))
    res = invoke("report", str(newer), "--out", str(tmp_path / "r"))
    assert res.exit_code == 1 and "has format version 2, this mcpipe reads 1" in res.output, res.output


def test_confusion_csv_matches_test_accuracy(sweep):
    run = sweep_runs(sweep)[("0.4", "2")]
    counts, classes = read_confusion(run / "confusion.csv")
    m = json.loads((run / "metrics.json").read_text())
    assert classes == list(CLASSES) and counts.sum() == m["test_images"] == 36
    assert np.trace(counts) / counts.sum() == pytest.approx(m["test_accuracy"])


@pytest.mark.slow
def test_head_run_report_without_images_says_so(sweep, tmp_path):
    run = sweep_runs(sweep)[("0.4", "2")]
    res = invoke("report", str(run), "--out", str(tmp_path / "r"), "--features", str(tmp_path / "nowhere"))
    assert res.exit_code == 0, res.output
    assert "suspect images not shown" in res.output and "nowhere" in res.output
    for name in ("training_curves.png", "scores.png", "confusion.png"):
        assert_png(tmp_path / "r" / name)
    assert not (tmp_path / "r" / "suspects.png").exists()
    assert "suspect images not shown" in (tmp_path / "r" / "index.html").read_text()


@pytest.mark.slow
def test_finetune_run_report(data, tmp_path):
    out = tmp_path / "ft"
    res = invoke("finetune", "--out", str(out), "--log-level", "warning", "--no-progress",
                 *sets("data.source=imagefolder", f"data.root={data}", "extract.backbone=resnet18",
                       "extract.weights=none", "extract.image_size=32", "finetune.batch_size=12", "finetune.epochs=2",
                       "finetune.workers=0", "finetune.device=cpu", "cleaner.subset_size=2", "cleaner.hidden=16"))
    assert res.exit_code == 0, res.output
    res = invoke("report", str(out))
    assert res.exit_code == 0, res.output
    assert_png(out / "report" / "training_curves.png")
    assert_png(out / "report" / "confusion.png")
    assert "finetune runs keep no per-image scores" in res.output
    assert referenced(out / "report" / "index.html") == {"training_curves.png", "confusion.png"}


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "has no metrics.json"),
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "metrics.json").write_text("{") and p, "not valid JSON"),
])
def test_report_refuses_what_is_not_a_run(tmp_path, make, message):
    target = make(tmp_path)
    res = invoke("report", str(target))
    assert res.exit_code == 1 and message in res.output
    assert not (tmp_path / "report").exists()


def test_run_config_records_what_made_the_features(sweep, data):
    """train-head reads features: the [data]/[extract] in its config.toml are the store's, not the CLI defaults."""
    for path in [sweep / "config.toml", *sorted(sweep.glob("*/config.toml"))]:
        cfg = tomllib.loads(path.read_text())
        assert cfg["extract"]["backbone"] == "resnet18" and cfg["extract"]["image_size"] == 32, path
        assert cfg["data"]["root"] == str(data) and cfg["data"]["source"] == "imagefolder", path
        assert "finetune" not in cfg, path
    assert "sweep" in tomllib.loads((sweep / "config.toml").read_text())
    rerun = invoke("sweep", "--features", str(data.parent / "features"), "--out", str(sweep), "--log-level", "info",
                   "--no-progress", *sets(*HEAD, "sweep.noise.rate=[0.0, 0.4]", "sweep.cleaner.subset_size=[1, 2]"))
    assert rerun.exit_code == 0 and "sweep 1/4" not in rerun.output, "finished points were retrained"
