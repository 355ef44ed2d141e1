"""metrics.json as records (mcpipe/records.py): the files keep their keys and key order, a newer mcpipe's extra keys
are ignored, and what is not a metrics file is refused with one line."""

from __future__ import annotations

import json

import pytest

from mcpipe.errors import DataError
from mcpipe.records import (Detection, FinetuneEpoch, FinetuneMetrics, HeadEpoch, HeadMetrics, LabelIssues, Noise,
                            read_metrics, write_metrics)

# as train-head and finetune wrote them before the records existed (keys in the order they were written)
HEAD = {"format_version": 1, "history": [{"epoch": 1, "loss": 0.9, "lr": 0.1, "images_per_second": 1e4,
                                          "val_accuracy": 0.5, "test_accuracy": 0.6}],
        "train_images": 100, "subset_size": 4, "noise": {"kind": "symmetric", "rate": 0.4, "realized_rate": 0.36},
        "features": "/f", "chosen_on": "val", "validation": {"source": "hold-out", "images": 10},
        "val_accuracy": 0.5, "val_clean_accuracy": 0.7, "test_accuracy": 0.6, "test_images": 50,
        "set_accuracy": 0.8,
        "detection": {"classifier": {"auroc": 0.9, "average_precision": 0.8, "flipped": 4, "known": 10,
                                     "f1_at_estimate": 0.7}},
        "label_issues": {"flagged": 4, "estimated_noise_rate": 0.4, "precision": 0.75, "recall": 0.75},
        "noise_detection_auroc": 0.9,
        "noise_detection_ap": 0.8, "ranked_by": "classifier", "seconds": 1.5}
FINETUNE = {"format_version": 1, "history": [{"epoch": 1, "phase": "cleaner", "loss": 1.2, "lr": 0.01,
                                              "backbone_lr": 0.001, "backbone_trained": True,
                                              "images_per_second": 50.0, "test_top1": 0.7, "test_images": 9,
                                              "test_top5": 0.9, "seconds": 3.0}],
            "seconds": 3.1, "train_images": 20, "images_replaced": 0,
            "phases": [{"name": "cleaner", "epochs": 1, "split": "train"}],
            "noise": {"kind": "none", "rate": 0.0, "realized_rate": 0.0}, "val_images": 0, "val_from": None,
            "chosen_on": "none", "exported_epoch": 1, "test_accuracy": 0.7, "test_top5": 0.9,
            "test_accuracy_last_epoch": 0.7}


@pytest.mark.parametrize("written", [HEAD, FINETUNE], ids=["train-head", "finetune"])
def test_a_file_read_and_written_again_is_the_same_file(written, tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(written, indent=2))  # as mcpipe writes it
    m = read_metrics(path)
    assert isinstance(m, FinetuneMetrics if "phases" in written else HeadMetrics)
    assert isinstance(m.noise, Noise) and all(isinstance(h, (HeadEpoch, FinetuneEpoch)) for h in m.history)
    if isinstance(m, HeadMetrics):
        assert isinstance(m.detection["classifier"], Detection) and isinstance(m.label_issues, LabelIssues)
    again = tmp_path / "again.json"
    write_metrics(m, again)
    assert again.read_text() == path.read_text()  # the same keys, values and order
    assert "val_from" in json.loads(again.read_text()) or "phases" not in written  # null, but always there


def test_a_newer_files_extra_keys_are_ignored_and_its_epochs_answer_the_reports_questions(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({**HEAD, "something_new": 1, "history": [{**HEAD["history"][0], "new_key": 2}]}))
    m = read_metrics(path)
    assert "something_new" not in m.to_dict() and m.history[0].to_dict() == HEAD["history"][0]
    row = m.history[0]
    assert (row.val_top1, row.test_top1, row.test_top5, row.phase) == (0.5, 0.6, None, None)


@pytest.mark.parametrize("text, says", [("{", "not valid JSON"), ("[]", "no training history"),
                                        ('{"history": 3}', "no training history"),
                                        ('{"history": [], "format_version": 2}', "format version 2"),
                                        ('{"history": [], "detection": {"alpha": {"auroc": 1}}}', "not a metrics.json")])
def test_what_is_not_a_metrics_file_of_this_version_is_refused(text, says, tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.raises(DataError, match=says):
        read_metrics(path)
    with pytest.raises(DataError, match="cannot read"):
        read_metrics(tmp_path / "missing.json")
