"""What a head run leaves behind: ``metrics.json``'s numbers, ``scores.csv``, ``confusion.csv``, ``head.pt``.

``finish`` scores every training image with the final head (and the search's
cross-validated probabilities, when there was a search), measures test and
validation accuracy and noise detection, and writes the files.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mcpipe.atomic import write_text_atomic
from mcpipe.cleaner import knn
from mcpipe.cleaner.auto import Search
from mcpipe.cleaner.head_file import save_head
from mcpipe.cleaner.metrics import accuracy, confusion, detection, label_truth
from mcpipe.cleaner.model import Head
from mcpipe.cleaner.train import alpha_scores, predict, set_accuracy
from mcpipe.config import Config, to_toml
from mcpipe.faults import pause_at
from mcpipe.records import HeadEpoch, HeadMetrics, LabelIssues, Noise
from mcpipe.rundir import write_confusion
from mcpipe.store.reader import FeatureStore
from mcpipe.store.schema import PROVENANCE_KEYS

if TYPE_CHECKING:
    from mcpipe.cleaner.inputs import RunLabels, Validation
    from mcpipe.cleaner.prepare import Prepared



def _provenance(store: FeatureStore) -> dict:
    return {k: store.attrs.get(k) for k in PROVENANCE_KEYS}


def finish(cfg: Config, prep: Prepared, head: Head, out: Path, labels: RunLabels, graph,
           history: list[HeadEpoch], fit_rows: np.ndarray, val: Validation | None,
           found: Search | None) -> HeadMetrics:
    """Score, measure and write the run's files (but metrics.json, written by the caller with its time)."""
    store = prep.train
    given, clean, keep = labels.given, labels.clean, labels.keep
    n = head.cleaner.subset_size
    pred, probs = predict(head, prep.train_x)
    rows = np.arange(len(given))
    scores = {
        "alpha": alpha_scores(head, prep.train_x, given, subset_size=n, repeats=cfg.cleaner.score_repeats,
                              seed=cfg.train.seed),
        "classifier": probs[rows, given],
    }
    if graph is not None:  # (cleaner.knn_score, or mining / rank_by that needed the graph)
        scores["knn"] = knn.agreement(graph, given)
    if found is not None and found.probs is not None:
        scores["cross_validated"] = found.probs[rows, given]
    m = HeadMetrics(history=history, train_images=int(keep.sum()), subset_size=n,
                    noise=Noise(cfg.noise.kind, cfg.noise.rate, float((given != labels.before_noise)[keep].mean())),
                    features=str(prep.features_dir.resolve()),
                    labels=None if labels.file is None else labels.file.record(store.labels))
    _validation_metrics(m, cfg, head, val, found)
    if prep.test is not None:
        test_pred = predict(head, prep.test_x)[0]
        m.test_accuracy = accuracy(test_pred, prep.test.labels)
        if m.search is not None and m.search["refit"]:  # reported, so the refit can be judged
            m.test_accuracy_before_refit = accuracy(predict(found.head, prep.test_x)[0], prep.test.labels)
        write_confusion(confusion(test_pred, prep.test.labels, store.num_classes), list(store.classes),
                        out / "confusion.csv")
        m.test_images = int(len(prep.test.labels))
        if n > 1:
            m.set_accuracy = set_accuracy(head, prep.test_x, prep.test.labels, subset_size=n, seed=cfg.train.seed)
    # a human check of the given label (Food-101N's verification) counts only for the labels as given
    verified = store.verified if cfg.noise.kind == "none" and labels.file is None else None
    known, wrong = label_truth(given, clean, verified)
    known, wrong = known & keep, wrong & keep  # a dropped row was not trained with its label: nothing to find
    flagged = None if found is None or found.issues is None else int(found.issues.sum())
    found_by = {name: detection(s, known, wrong, flag=flagged) for name, s in scores.items()}
    m.detection = {name: d for name, d in found_by.items() if d is not None}
    if found is not None and found.issues is not None:
        m.label_issues = _issue_metrics(found.issues, known, wrong)
    rank = cfg.train.rank_by
    if found_by.get(rank) is not None:
        m.noise_detection_auroc = found_by[rank].auroc
        m.noise_detection_ap = found_by[rank].average_precision
    m.ranked_by = rank
    trained = found.labels if found is not None else given
    weights = found.weights if found is not None else np.ones(len(given))
    split = np.full(len(given), "val", dtype=object)  # the hold-out, or images a val.h5 shares with train.h5
    split[fit_rows] = "fit"
    split[~keep] = "dropped"  # by the label file: neither trained nor chosen on
    _write_scores(out / "scores.csv", store, given, clean, np.where(known, ~wrong, -1), pred, scores, rank,
                  issues=None if found is None else found.issues,
                  trained=np.where((weights > 0) & keep, trained, -1),
                  split=split)
    pause_at("head_export")  # (tests: a kill here leaves scores.csv of this run and no head.pt yet)
    save_head(out / "head.pt", head, classes=list(store.classes), feature_dim=store.feature_dim,
              provenance=_provenance(store), config=to_toml(cfg))
    return m


def _validation_metrics(m: HeadMetrics, cfg: Config, head: Head, val: Validation | None,
                        found: Search | None) -> None:
    """Into ``m``: what chose, and how the final model does on it (against the given labels; clean ones where
    known)."""
    if val is None:
        m.chosen_on = "none"
        return
    m.chosen_on, m.validation = "val", {"source": val.source, "images": int(len(val.given))}
    refitted = found is not None and cfg.train.refit and val.rows is not None
    if found is not None:
        m.search = {"chosen": found.choice.name, "refit": refitted, "seconds": round(found.seconds, 3),
                    "candidates": [c.record() for c in found.candidates]}
        m.best_epoch = found.choice.best_epoch
    # the model that never saw the validation rows: the final one, or the chosen candidate before its refit
    pred = predict(found.head if refitted else head, val.x)[0]
    m.val_accuracy = accuracy(pred, val.given)
    if (val.clean >= 0).any():
        known = val.clean >= 0
        m.val_clean_accuracy = accuracy(pred[known], val.clean[known])


def _issue_metrics(issues: np.ndarray, known: np.ndarray, wrong: np.ndarray) -> LabelIssues:
    """How the second round's flags compare with the truth, where it is known."""
    m = LabelIssues(int(issues.sum()), float(issues.mean()))
    if known.any():
        tp = int((issues & wrong & known).sum())
        m.precision = tp / max(int((issues & known).sum()), 1)
        m.recall = tp / max(int(wrong.sum()), 1)
    return m


def _write_scores(path: Path, store: FeatureStore, given, clean, correct, pred, scores: dict, rank: str, *,
                  issues: np.ndarray | None, trained: np.ndarray, split: np.ndarray) -> None:
    """One row per training image, most suspect (lowest ``rank`` score) first.

    ``correct``: (M,) 1 given label known right, 0 known wrong, -1 unknown (written as "").
    Both rounds' view: ``cross_validated_score`` (round 1's out-of-sample p(given)) and ``label_issue``
    (flagged by confident learning), then ``trained_label`` (what the final model trained with; empty =
    dropped) and the final model's ``classifier_score``. ``split``: fit, or val (chosen on, not trained on before
    a refit)."""
    order = np.argsort(scores[rank], kind="stable")
    names = store.classes
    cv, nb = scores.get("cross_validated"), scores.get("knn")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "id", "split", "given_label", "predicted_label", "clean_label", "given_label_correct",
                "alpha_score", "classifier_score", "knn_score", "cross_validated_score", "label_issue",
                "trained_label"])
    for r, i in enumerate(order, 1):
        w.writerow([r, store.ids[i], split[i], names[given[i]], names[pred[i]],
                    names[clean[i]] if clean[i] >= 0 else "", "" if correct[i] < 0 else int(correct[i]),
                    f"{scores['alpha'][i]:.5f}", f"{scores['classifier'][i]:.5f}", "" if nb is None else f"{nb[i]:.4f}",
                    "" if cv is None else f"{cv[i]:.5f}", "" if issues is None else int(issues[i]),
                    names[trained[i]] if trained[i] >= 0 else ""])
    write_text_atomic(buf.getvalue(), path)  # a full disk or read-only folder: one line naming the file
