"""mcpipe clean: a head run's scores as a label file (keep / relabel / drop the flagged rows)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mcpipe.cli import app

runner = CliRunner()
HEADER = ("rank,id,split,given_label,predicted_label,clean_label,given_label_correct,alpha_score,classifier_score,"
          "knn_score,cross_validated_score,label_issue,trained_label")


@pytest.fixture
def run(tmp_path):
    """A run folder with 10 rows: row i has cross-validated score i / 10, prediction 'b', given 'a' or 'b'."""
    d = tmp_path / "run"
    d.mkdir()
    lines = [HEADER] + [f"{i + 1},img{i},fit,{'a' if i % 2 else 'b'},b,,,0.5,{0.9 - i / 20:.5f},0.5,{i / 10:.5f},,"
                        for i in range(10)]
    (d / "scores.csv").write_text("\n".join(lines) + "\n")
    metrics = {"history": [], "label_issues": {"flagged": 3, "estimated_noise_rate": 0.3}}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def invoke(*args):
    return runner.invoke(app, ["clean", *map(str, args)])


def rows(path):
    return list(csv.DictReader(path.read_text().splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","))


def test_keep_relabel_drop_at_the_runs_estimate(run, tmp_path):
    res = invoke(run, "--out", tmp_path / "keep.csv")
    assert res.exit_code == 0, res.output
    assert "3 of 10 labels flagged (0.300, the run's estimated noise rate; by cross_validated_score)" in res.output
    keep = rows(tmp_path / "keep.csv")
    assert list(keep[0]) == ["id", "given_label", "suggested_label", "label_score", "is_label_issue", "label"]
    assert [r["is_label_issue"] for r in keep] == ["1"] * 3 + ["0"] * 7  # the three lowest label scores
    assert [r["label"] for r in keep] == [r["given_label"] for r in keep]
    assert [float(r["label_score"]) for r in keep] == pytest.approx(np.arange(10) / 10)

    assert invoke(run, "--out", tmp_path / "relabel.tsv", "--action", "relabel").exit_code == 0
    relabel = rows(tmp_path / "relabel.tsv")
    assert [r["label"] for r in relabel] == ["b"] * 3 + [r["given_label"] for r in relabel[3:]]

    res = invoke(run, "--out", tmp_path / "drop.csv", "--action", "drop", "--fraction", "0.5")
    assert res.exit_code == 0 and "5 of 10 labels flagged (0.500, given" in res.output
    assert "10 rows" in res.output and "(5 dropped: empty label)" in res.output
    drop = rows(tmp_path / "drop.csv")  # every row stays (--labels needs them all); the flagged ones lose their label
    assert [r["id"] for r in drop] == [f"img{i}" for i in range(10)]
    assert [r["label"] for r in drop] == [""] * 5 + [r["given_label"] for r in drop[5:]]


def test_rows_the_run_dropped_stay_dropped_and_are_not_flagged(run, tmp_path):
    text = (run / "scores.csv").read_text().splitlines()
    text[1] = text[1].replace(",fit,", ",dropped,")  # img0, the lowest score, was left out by the run's label file
    (run / "scores.csv").write_text("\n".join(text) + "\n")
    res = invoke(run, "--out", tmp_path / "keep.csv", "--fraction", "0.2")
    assert res.exit_code == 0 and "(1 dropped: empty label)" in res.output, res.output
    keep = rows(tmp_path / "keep.csv")
    assert keep[0]["id"] == "img0" and keep[0]["label"] == "" and keep[0]["is_label_issue"] == "0"
    assert [r["id"] for r in keep if r["is_label_issue"] == "1"] == ["img1", "img2"]  # 0.2 of the 9 others


def test_classifier_score_without_cross_validation_and_refusals(run, tmp_path):
    text = (run / "scores.csv").read_text().splitlines()
    (run / "scores.csv").write_text("\n".join([text[0]] + [line.rsplit(",", 3)[0] + ",,," for line in text[1:]]) + "\n")
    res = invoke(run, "--out", tmp_path / "a.csv", "--fraction", "0.2")
    assert res.exit_code == 0 and "by classifier_score" in res.output
    assert [r["id"] for r in rows(tmp_path / "a.csv") if r["is_label_issue"] == "1"] == ["img8", "img9"]  # in scores.csv order

    before = (tmp_path / "a.csv").read_bytes()
    for args, code, words in [
        (("--out", tmp_path / "a.csv"), 2, "exists; --overwrite"),
        (("--out", tmp_path / "b.csv", "--action", "fix"), 2, "--action 'fix' is invalid"),
        (("--out", tmp_path / "b.csv", "--fraction", "1.5"), 2, "--fraction 1.5 is invalid"),
    ]:
        res = invoke(run, *args)
        assert res.exit_code == code and words in res.output and "Traceback" not in res.output, res.output
    assert (tmp_path / "a.csv").read_bytes() == before and not (tmp_path / "b.csv").exists()
    (run / "metrics.json").write_text("{}")
    res = invoke(run, "--out", tmp_path / "b.csv")
    assert res.exit_code == 1 and "no estimate of the noise rate" in res.output and "--fraction" in res.output
    res = invoke(tmp_path / "nowhere", "--out", tmp_path / "b.csv", "--fraction", "0.1")
    assert res.exit_code == 1 and "no scores.csv" in res.output
