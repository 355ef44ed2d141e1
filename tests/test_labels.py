"""--labels FILE: a label file replaces the training labels of train-head, sweep, finetune and report; mcpipe
clean's output round-trips through --labels and through extract's manifest source."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke
from fixtures_data import make_imagefolder, make_noisy_colour_images
from mcpipe.errors import DataError
from mcpipe.labels import read_label_file
from mcpipe.store.reader import open_store

FAST = ["--set", "train.auto=false", "--set", "train.epochs=3", "--no-progress", "--log-level", "warning"]


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        w.writerow(header)
        w.writerows(rows)
    return path


def store_labels(feats: Path, path: Path, *, flip_every: int = 0, drop: tuple[int, ...] = ()) -> Path:
    """A label file of train.h5's own labels; every ``flip_every``-th row moved to the next class, ``drop``
    rows left empty (with the given_label column that allows it)."""
    s = open_store(feats / "train.h5", load_features=False)
    rows = []
    for i, (x, y) in enumerate(zip(s.ids, s.labels)):
        label = s.classes[(y + 1) % s.num_classes] if flip_every and i % flip_every == 0 else s.classes[y]
        rows.append([x, s.classes[y], "" if i in drop else label])
    return write_table(path, ["id", "given_label", "label"], rows)


def scores(run: Path) -> dict[str, dict]:
    return {r["id"]: r for r in csv.DictReader((run / "scores.csv").read_text().splitlines())}


# ---------------------------------------------------------------- the file format

def test_read_label_file_matches_ids_and_names_every_problem_in_one_line(tmp_path):
    ids, classes = ["a", "b", "c"], ["cat", "dog"]
    ok = write_table(tmp_path / "ok.tsv", ["clean_label", "label", "id"], [["", "dog", "c"], ["cat", "cat", "a"],
                                                                           ["dog", "cat", "b"]])
    f = read_label_file(ok, ids, classes)
    assert f.labels.tolist() == [0, 0, 1] and f.clean_labels.tolist() == [0, 1, -1] and f.dropped == 0
    assert f.sha256 == hashlib.sha256(ok.read_bytes()).hexdigest()
    by_path = read_label_file(write_table(tmp_path / "m.csv", ["path", "label"], [["a", "dog"], ["b", "dog"],
                                                                                 ["c", "cat"]]), ids, classes)
    assert by_path.labels.tolist() == [1, 1, 0] and by_path.clean_labels is None  # a manifest's path column
    dropped = read_label_file(write_table(tmp_path / "d.csv", ["id", "given_label", "label"],
                                          [["a", "cat", ""], ["b", "dog", "dog"], ["c", "cat", "cat"]]), ids, classes)
    assert dropped.keep.tolist() == [False, True, True] and dropped.record(np.array([0, 0, 0]))["changed"] == 1

    cases = [
        (["id", "label"], [["a", "cat"], ["b", "cat"], ["b", "dog"], ["c", "cat"]], "1 row has an id listed before (first: line 4, 'b')"),
        (["id", "label"], [["a", "cat"], ["b", "cat"], ["c", "cat"], ["x", "cat"], ["y", "cat"]], "2 rows have an id that is not in"),
        (["id", "label"], [["a", "cat"]], "lists 1 of the 3 ids of the training split: 2 missing (first: 'b')"),
        (["id", "label"], [["a", "cat"], ["b", "bird"], ["c", "cow"]], "2 rows have a label that is not one of the 2 classes (first: line 3, 'bird')"),
        (["id", "label"], [["a", ""], ["b", "cat"], ["c", "cat"]], "1 row has an empty label (only a file with a given_label column"),
        (["id", "given_label", "label"], [["a", "cat", ""], ["b", "cat", ""], ["c", "cat", ""]], "drops every image"),
        (["name", "label"], [["a", "cat"]], "header lacks the column(s) id"),
        (["id", "label", "clean_label"], [["a", "cat", "emu"], ["b", "cat", ""], ["c", "cat", ""]], "a clean_label that is not one"),
    ]
    for header, rows, words in cases:
        with pytest.raises(DataError) as err:
            read_label_file(write_table(tmp_path / "bad.csv", header, rows), ids, classes)
        assert words in str(err.value) and "\n" not in str(err.value), (words, str(err.value))
    with pytest.raises(DataError, match="does not exist"):
        read_label_file(tmp_path / "none.csv", ids, classes)


# ---------------------------------------------------------------- train-head

def test_train_head_with_the_stores_own_labels_equals_a_run_without_a_file(feats, tmp_path):
    before = (feats / "train.h5").read_bytes()
    same = store_labels(feats, tmp_path / "same.csv")
    assert invoke("train-head", "--features", feats, "--out", tmp_path / "plain", *FAST).exit_code == 0
    res = invoke("train-head", "--features", feats, "--out", tmp_path / "same", "--labels", same, *FAST)
    assert res.exit_code == 0, res.output
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("plain", "same"))
    timeless = lambda m: [{k: v for k, v in h.items() if k != "images_per_second"} for h in m["history"]]  # noqa: E731
    assert a["test_accuracy"] == b["test_accuracy"] and timeless(a) == timeless(b)
    assert scores(tmp_path / "plain") == scores(tmp_path / "same")
    digest = hashlib.sha256(same.read_bytes()).hexdigest()
    assert b["labels"] == {"file": str(same), "sha256": digest, "rows": 600, "dropped": 0, "clean_labels": False,
                           "changed": 0}
    config = (tmp_path / "same" / "config.toml").read_text()
    assert f'[labels]\nfile = "{same}"\n# sha256 of the label file: {digest}' in config
    assert "[labels]" not in (tmp_path / "plain" / "config.toml").read_text()  # unchanged without a file
    assert (feats / "train.h5").read_bytes() == before  # the store is never rewritten


def test_flipped_and_dropped_rows_are_trained_as_the_file_says(feats, tmp_path):
    path = store_labels(feats, tmp_path / "l.csv", flip_every=4, drop=(1, 2, 3))
    res = invoke("train-head", "--features", feats, "--out", tmp_path / "run", "--labels", path, *FAST)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["train_images"] == 597 and m["labels"]["dropped"] == 3 and m["labels"]["changed"] == 150
    s = open_store(feats / "train.h5", load_features=False)
    rows = scores(tmp_path / "run")
    assert sorted(x for x, r in rows.items() if r["split"] == "dropped") == sorted(s.ids[1:4])
    assert rows[s.ids[0]]["given_label"] == s.classes[(s.labels[0] + 1) % 5]  # flipped by the file
    assert rows[s.ids[0]]["given_label_correct"] == "0"  # the store's clean labels still judge it
    assert all(rows[x]["trained_label"] == "" for x in s.ids[1:4])
    assert m["detection"]["classifier"]["known"] == 597 and m["detection"]["classifier"]["flipped"] == 150

    path.write_text(path.read_text().replace(",class", ",class", 1) + "\n")  # same name, other bytes
    res = invoke("train-head", "--features", feats, "--out", tmp_path / "run", "--labels", path, "--resume", *FAST)
    assert res.exit_code != 0 and "same config" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.slow
def test_clean_round_trips_through_train_head_and_report(feats, tmp_path):
    flipped = store_labels(feats, tmp_path / "flipped.csv", flip_every=4)
    linear = [*FAST, "--set", "cleaner.subset_size=1", "--set", "train.epochs=10"]
    assert invoke("train-head", "--features", feats, "--out", tmp_path / "r1", "--labels", flipped, *linear).exit_code == 0
    res = invoke("clean", tmp_path / "r1", "--out", tmp_path / "cleaned.csv", "--action", "drop", "--fraction", "0.25")
    assert res.exit_code == 0 and "(150 dropped: empty label)" in res.output, res.output
    res = invoke("train-head", "--features", feats, "--out", tmp_path / "r2", "--labels", tmp_path / "cleaned.csv",
                 *linear)
    assert res.exit_code == 0, res.output
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("r1", "r2"))
    assert m2["train_images"] == 450 and m2["labels"]["dropped"] == 150
    # the flagged rows were mostly the flipped ones: fewer wrong labels are trained on
    assert m2["detection"]["classifier"]["flipped"] < m1["detection"]["classifier"]["flipped"] / 2
    res = invoke("clean", tmp_path / "r2", "--out", tmp_path / "again.csv", "--fraction", "0.1")
    assert res.exit_code == 0 and "(150 dropped: empty label)" in res.output  # still dropped, not re-flagged

    # report --labels: judged against the store's own labels (a "re-annotation"), the flips are found again
    truth = store_labels(feats, tmp_path / "truth.csv")
    res = invoke("report", tmp_path / "r1", "--labels", truth, "--suspects", "0", "--out", tmp_path / "rep")
    assert res.exit_code == 0 and f"labels from {truth}" in res.output, res.output
    assert (tmp_path / "rep" / "scores.png").exists()
    res = invoke("report", tmp_path / "r1", "--labels", tmp_path / "none.csv")
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output


def test_sweep_passes_the_file_to_every_point(feats, tmp_path):
    path = store_labels(feats, tmp_path / "l.csv", flip_every=3)
    res = invoke("sweep", "--features", feats, "--out", tmp_path / "sw", "--labels", path, *FAST,
                 "--set", "sweep.cleaner.subset_size=[1, 2]")
    assert res.exit_code == 0, res.output
    runs = sorted(p for p in (tmp_path / "sw").iterdir() if p.is_dir())
    assert len(runs) == 2 and all(json.loads((r / "metrics.json").read_text())["labels"]["changed"] == 200
                                  for r in runs)
    assert "[labels]" in (tmp_path / "sw" / "config.toml").read_text()


def test_refusals_name_the_file_and_the_count(feats, tmp_path):
    bad = write_table(tmp_path / "bad.csv", ["id", "label"], [["nope", "class0"]])
    for cmd in (["train-head", "--out", tmp_path / "r"], ["sweep", "--out", tmp_path / "s",
                                                          "--set", "sweep.cleaner.subset_size=[1]"]):
        res = invoke(*cmd, "--features", feats, "--labels", bad, *FAST)
        assert res.exit_code == 1 and "1 row has an id that is not in" in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "metrics.json").exists()


# ---------------------------------------------------------------- finetune and the manifest source

IMG = ["--set", "extract.backbone=resnet18", "--set", "extract.weights=none", "--set", "extract.image_size=32"]


@pytest.mark.slow
def test_finetune_trains_on_the_files_labels(tmp_path):
    data = make_noisy_colour_images(tmp_path / "data", {"train": 6, "test": 2})
    from mcpipe.config import DataConfig
    from mcpipe.extract.sources.registry import load_index

    index = load_index(DataConfig(source="imagefolder", root=str(data)), "train")
    rows = [[x, index.classes[y], "" if i < 3 else index.classes[y]] for i, (x, y) in enumerate(zip(index.ids, index.labels))]
    path = write_table(tmp_path / "l.csv", ["id", "given_label", "label"], rows)
    common = [*IMG, "--set", "data.source=imagefolder", "--set", f"data.root={data}", "--set", "finetune.epochs=1",
              "--set", "finetune.batch_size=6", "--set", "finetune.workers=0", "--set", "finetune.device=cpu",
              "--set", "cleaner.subset_size=2", "--set", "cleaner.hidden=8", "--set", "finetune.val_fraction=0",
              "--no-progress", "--log-level", "warning"]
    res = invoke("finetune", "--out", tmp_path / "ft", "--labels", path, *common)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["train_images"] == 15 and m["labels"]["dropped"] == 3 and m["labels"]["sha256"]
    assert "[labels]" in (tmp_path / "ft" / "config.toml").read_text()
    bad = write_table(tmp_path / "bad.csv", ["id", "label"], [[x, "c9"] for x in index.ids])
    res = invoke("finetune", "--out", tmp_path / "ft2", "--labels", bad, *common)
    assert res.exit_code == 1 and "18 rows have a label that is not one of the 3 classes" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "ft2" / "metrics.json").exists()


@pytest.mark.slow
def test_a_cleaned_label_file_is_a_manifest_for_extract(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", classes=("cat", "dog"), per_class=6)
    quiet = ["--no-progress", "--log-level", "warning"]
    assert invoke("extract", "--out", tmp_path / "f", "--set", f"data.root={root}", *IMG, *quiet).exit_code == 0
    assert invoke("train-head", "--features", tmp_path / "f", "--out", tmp_path / "run", *FAST,
                  "--set", "train.val_fraction=0").exit_code == 0
    res = invoke("clean", tmp_path / "run", "--out", root / "train.csv", "--action", "drop", "--fraction", "0.25")
    assert res.exit_code == 0, res.output
    (root / "classes.txt").write_text("cat\ndog\n")
    res = invoke("extract", "--out", tmp_path / "f2", "--set", "data.source=manifest", "--set", f"data.root={root}",
                 *IMG, *quiet)
    assert res.exit_code == 0, res.output
    kept = {r["id"]: r["label"] for r in csv.DictReader((root / "train.csv").read_text().splitlines()) if r["label"]}
    a, b = open_store(tmp_path / "f" / "train.h5"), open_store(tmp_path / "f2" / "train.h5")
    assert len(b.ids) == len(kept) == 9 and {x: b.classes[y] for x, y in zip(b.ids, b.labels)} == kept
    rows = {x: i for i, x in enumerate(a.ids)}
    np.testing.assert_array_equal(b.features, a.features[[rows[x] for x in b.ids]])  # the same images


def test_a_label_file_is_not_noised_again(feats, tmp_path):
    path = store_labels(feats, tmp_path / "l.csv")
    res = invoke("train-head", "--features", feats, "--out", tmp_path / "r", "--labels", path, *FAST,
                 "--set", "noise.kind=symmetric", "--set", "noise.rate=0.2")
    assert res.exit_code == 2 and "noise.kind = 'symmetric' is invalid: expected none when labels.file is set" \
        in res.output and not (tmp_path / "r").exists(), res.output
