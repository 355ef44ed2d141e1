"""``train.auto``: choose the head for the user's labels on the validation split, in one process.

Candidates, all trained on the fit rows (training rows minus the hold-out)
and scored every epoch on the validation rows against their *given* labels
(the test split is never read here):

1. Round 1, softmax (N = 1): one head per weight decay in
   ``train.search_weight_decays``, trained together in one batched pass
   (:mod:`mcpipe.cleaner.linear`).
2. Round 1, MetaCleaner: one head per subset size N > 1 of
   ``train.search_sizes`` (default: ``cleaner.subset_size``), with the
   configured weighting and weight decay.
3. Round 2 (``train.second_round``): ``train.cv_folds`` softmax heads, each
   trained without one fold (one batched pass), give every fit row an
   out-of-sample probability (the validation rows get the round-1 head's).
   Their weight decay is the best round-1 one, re-chosen once on the
   noise-corrected score below. Confident learning (:mod:`.issues`) flags
   the labels that look wrong with per-class thresholds and estimates the
   noise matrix; one batched pass then trains, per weight decay, a head that
   drops the flagged rows and one that relabels them to their most probable
   class.

Every candidate keeps the *latest* epoch within one paired standard error
of its best (:class:`~mcpipe.cleaner.linear.EpochChooser`). Candidates are
compared on a noise-corrected validation score (accuracy against the given
labels corrected with the inverse of the estimated noise matrix,
:func:`.issues.corrected_gain`; plain accuracy without a second round), and
the first candidate within one paired standard error of the best is chosen,
in the order above (round 1 before MetaCleaner before round 2; inside each,
the larger weight decay first: the classic one-standard-error rule, which
takes the most regularised model that validation cannot tell from the best).
A thousand noisy validation labels cannot separate candidates a tenth of a
point apart; choosing the raw maximum would choose by chance.

Why this set: on frozen features, accuracy under label noise depends first on
regularisation (weight decay, early stopping: they stop the linear head from
fitting the flipped labels), then on removing the labels that look wrong
(most of the gain under heavy or structured noise); MetaCleaner's subsets
compete where they beat those. The softmax heads cost little (one batched
pass trains a dozen), so the whole search costs about two fixed-configuration
MetaCleaner runs on the demo's features (measured by ``bench/accuracy.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from mcpipe.cleaner.issues import ACTIONS, cleaned, corrected_gain, find_issues, noise_matrix
from mcpipe.cleaner.linear import TOLERANCE, EpochChooser, LinearFits, fit_linear_heads
from mcpipe.cleaner.model import Head
from mcpipe.cleaner.sampler import OnRows
from mcpipe.cleaner.split import folds
from mcpipe.cleaner.train import make_optimizer, predict, train_one_epoch
from mcpipe.config import Config, replace

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One configuration the search trained, with what validation said of it."""

    name: str
    round: int
    subset_size: int
    weight_decay: float
    action: str = ""           # round 2: drop | relabel
    val_accuracy: float = float("nan")   # against the given validation labels, at the best epoch
    best_epoch: int = 0
    seconds: float = 0.0
    val_curve: list[float] = field(default_factory=list)  # validation score per epoch (chose the best epoch)
    val_score: float = float("nan")      # what chooses: val_accuracy corrected for the estimated noise
    val_clean_accuracy: float = float("nan")  # against the true validation labels where known: reported, never used

    def record(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()
                if k != "val_curve"} | {"val_curve": [round(a, 5) for a in self.val_curve]}


@dataclass
class Search:
    """What the search found: the candidates, the chosen one and the labels it trains with.

    Attributes:
        labels, weights: (M,) the chosen candidate's training labels and row weights over *all* training rows
            (for a second-round candidate: the flagged rows relabelled or at weight 0, validation rows included,
            ready for a refit).
        probs: (M, C) round-1 out-of-sample probabilities (cross-validated on fit rows, the round-1 head's on
            validation rows), or None without a second round. issues: (M,) bool flagged labels, or None.
        gain: (C, C) the noise-corrected validation score (:func:`.issues.corrected_gain`), or None.
        head: the chosen candidate as trained during the search (fit rows only).
    """

    candidates: list[Candidate]
    chosen: int
    head: Head
    labels: np.ndarray
    weights: np.ndarray
    probs: np.ndarray | None = None
    issues: np.ndarray | None = None
    gain: np.ndarray | None = None
    seconds: float = 0.0

    @property
    def choice(self) -> Candidate:
        return self.candidates[self.chosen]


def search_sizes(cfg: Config) -> list[int]:
    return sorted(set(cfg.train.search_sizes or (1, cfg.cleaner.subset_size)))


def linear_head(cfg: Config, weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor) -> Head:
    """A linear head (weight (C, D), bias (C,) on standardised features) as an N = 1 :class:`Head`."""
    c = cfg.cleaner
    with torch.random.fork_rng(devices=[]):  # the (unused) cleaner's weights: seeded, so runs repeat exactly
        torch.manual_seed(cfg.train.seed)
        head = Head(weight.shape[1], weight.shape[0], subset_size=1, hidden=c.hidden, weighting=c.weighting,
                    combine=c.combine, mean=mean.cpu(), std=std.cpu())
    with torch.no_grad():
        head.classifier.weight.copy_(weight.cpu())
        head.classifier.bias.copy_(bias.cpu())
    return head.to(weight.device)


def train_cleaner(cfg: Config, head: Head, features: Tensor, given: Tensor, sampler: OnRows, *, epochs: int,
                  val: tuple[Tensor, np.ndarray] | None,
                  on_epoch: Callable[[int, Head, float], None] | None = None) -> tuple[Head, list[float], int]:
    """Train ``head`` for ``epochs`` epochs; keep the state of the epoch validation chooses (:class:`EpochChooser`).

    Returns (head at that epoch (the last without ``val``), validation accuracy per epoch, that epoch).
    ``on_epoch(epoch, head, loss)`` is called after every epoch.
    """
    optimizer, scheduler = make_optimizer(head, cfg.train)
    curve: list[float] = []
    chooser, chosen_state = EpochChooser(1), None
    for epoch in range(epochs):
        stats = train_one_epoch(head, features, given, sampler, epoch, optimizer)
        scheduler.step()
        if val is not None:
            hits = torch.from_numpy(predict(head, val[0])[0] == val[1]).float()[None]
            curve.append(float(hits.mean()))
            if chooser.update(epoch, hits)[0]:
                chosen_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if on_epoch is not None:
            on_epoch(epoch, head, stats["loss"])
    if chosen_state is not None:
        head.load_state_dict(chosen_state)
    return head, curve, int(chooser.chosen_epoch[0]) if val is not None else epochs


def _row_scores(pred: np.ndarray, given: np.ndarray, gain: np.ndarray | None) -> np.ndarray:
    """(V,) gain[pred, given] per validation row (1/0 hits when gain is None)."""
    return (pred == given).astype(np.float64) if gain is None else gain[pred, given]


def _score(pred: np.ndarray, given: np.ndarray, gain: np.ndarray | None) -> float:
    return float(_row_scores(pred, given, gain).mean())


def _choose(rows: np.ndarray) -> int:
    """(K, V) row scores of K candidates, simplest first -> the first candidate within ``TOLERANCE`` paired
    standard errors of the best: a candidate is passed over only when validation can tell it is worse."""
    means = rows.mean(1)
    diff = rows[int(np.argmax(means))] - rows
    se = diff.std(1, ddof=1) / np.sqrt(max(rows.shape[1], 1))
    return int(np.flatnonzero(diff.mean(1) <= TOLERANCE * se + 1e-12)[0])


def search(cfg: Config, features: Tensor, given: np.ndarray, fit_rows: np.ndarray, val: tuple[Tensor, np.ndarray],
           *, num_classes: int, val_rows: np.ndarray | None, mean: Tensor, std: Tensor,
           new_head: Callable[[Config], Head], cleaner_sampler: Callable[[Config], OnRows],
           val_clean: np.ndarray | None = None) -> Search:
    """Train the candidates (see the module docstring) and choose one on ``val``.

    Args:
        features: (M, D) training features on the device. given: (M,) the given labels, in [0, num_classes).
        fit_rows: rows trained on. val: (validation features, their given labels), from the hold-out
            (``val_rows`` = their rows in ``features``) or from a val.h5 store (``val_rows`` = None).
        mean, std: (D,) the standardisation every head uses.
        new_head: config -> a fresh :class:`Head` (seeded). cleaner_sampler: config -> sampler over fit rows.
        val_clean: (V,) true validation labels, -1 unknown: each candidate's accuracy against them is recorded
            for the user (synthetic noise experiments) and never read by the choice.
    """
    start = time.perf_counter()
    t = cfg.train
    wds = np.sort(np.asarray(t.search_weight_decays, dtype=np.float64))[::-1].copy()  # most regularised first
    sizes = search_sizes(cfg)
    y_fit = given[fit_rows]
    val_x, val_y = val
    candidates: list[Candidate] = []
    heads: list[Callable[[], Head]] = []   # builds each candidate's head on demand
    val_preds: list[np.ndarray] = []       # each candidate's validation predictions at its best epoch

    def linear_pass(labels: np.ndarray, weights: np.ndarray, decays: np.ndarray,
                    gain: np.ndarray | None = None) -> tuple[LinearFits, float]:
        s = time.perf_counter()
        fits = fit_linear_heads(features, fit_rows, labels, weights, decays, num_classes=num_classes, mean=mean,
                                std=std, train=t, val=val, gain=gain, seed=t.seed)
        return fits, time.perf_counter() - s

    # round 1, softmax: one batched pass over the weight decays
    h = len(wds)
    r1, secs = linear_pass(np.tile(y_fit, (h, 1)), np.ones((h, len(fit_rows)), np.float32), wds)
    r1_pred = r1.probabilities(val_x).argmax(-1)  # (V, H)
    if 1 in sizes:
        for i, wd in enumerate(wds):
            candidates.append(Candidate(f"softmax, weight decay {wd:g}", 1, 1, float(wd), "", 0.0,
                                        int(r1.best_epoch[i]), secs / h, r1.curves[:, i].tolist()))
            heads.append(lambda i=i: linear_head(cfg, r1.weight[i], r1.bias[i], mean, std))
            val_preds.append(r1_pred[:, i])
    log.info("round 1: %d softmax heads in %.1f s, validation accuracy %s", h, secs,
             " ".join(f"{a:.4f}" for a in r1.val_accuracy))

    # round 1, MetaCleaner: one run per N > 1
    for n in (s for s in sizes if s > 1):
        s = time.perf_counter()
        point = replace(cfg, "cleaner", subset_size=n)
        head, curve, best_epoch = train_cleaner(point, new_head(point), features, torch.from_numpy(given).to(
            features.device), cleaner_sampler(point), epochs=t.epochs, val=val)
        candidates.append(Candidate(f"MetaCleaner N = {n}, {cfg.cleaner.weighting}", 1, n, t.weight_decay, "",
                                    0.0, best_epoch, time.perf_counter() - s, curve))
        heads.append(lambda head=head: head)
        val_preds.append(predict(head, val_x)[0])
        log.info("round 1: MetaCleaner N = %d in %.1f s, validation accuracy %.4f (epoch %d)", n,
                 candidates[-1].seconds, max(curve), best_epoch)

    probs = issues = gain = None
    all_labels = {"": (given.copy(), np.ones(len(given), np.float32))}
    if t.second_round:
        fold = folds(y_fit, t.cv_folds, seed=t.seed)
        k = t.cv_folds
        s = time.perf_counter()

        def out_of_sample(wd_index: int) -> np.ndarray:
            """(M, C): fit rows cross-validated at that weight decay, validation rows from its round-1 head."""
            cv, _ = linear_pass(np.tile(y_fit, (k, 1)),
                                (fold[None, :] != np.arange(k)[:, None]).astype(np.float32), np.full(k, wds[wd_index]))
            out = np.zeros((len(given), num_classes), np.float32)
            out[fit_rows] = cv.probabilities(features[torch.from_numpy(fit_rows).to(features.device)])[
                np.arange(len(fit_rows)), fold]
            if val_rows is not None and len(val_rows):
                out[val_rows] = r1.probabilities(val_x, [wd_index])[:, 0]
            return out

        # the weight decay of the cross-validated heads: best on the given labels, then once more on the
        # noise-corrected score those heads' noise estimate gives (under structured noise the two differ)
        best_wd = int(np.argmax(r1.val_accuracy))  # first on ties
        probs = out_of_sample(best_wd)
        gain = corrected_gain(noise_matrix(y_fit, probs[fit_rows]))
        corrected = int(np.argmax([_score(r1_pred[:, i], val_y, gain) for i in range(h)]))
        if corrected != best_wd:
            best_wd = corrected
            probs = out_of_sample(best_wd)
            gain = corrected_gain(noise_matrix(y_fit, probs[fit_rows]))
        issues = np.zeros(len(given), dtype=bool)
        scored = fit_rows if val_rows is None else np.sort(np.concatenate([fit_rows, val_rows]))
        issues[scored] = find_issues(given[scored], probs[scored])
        flagged_fit = issues[fit_rows]
        log.info("round 2: %d-fold probabilities (weight decay %g) in %.1f s; %d of %d fit labels flagged (%.1f%%)",
                 k, wds[best_wd], time.perf_counter() - s, flagged_fit.sum(), len(fit_rows), 100 * flagged_fit.mean())
        labels, weights, decays, names = [], [], [], []
        for action in ACTIONS:
            y_all, w_all = cleaned(given, probs, issues, action)
            all_labels[action] = (y_all, w_all)
            for wd in wds:
                labels.append(y_all[fit_rows])
                weights.append(w_all[fit_rows])
                decays.append(wd)
                names.append(action)
        r2, secs = linear_pass(np.stack(labels), np.stack(weights), np.asarray(decays), gain)
        cv_secs = time.perf_counter() - s - secs
        r2_pred = r2.probabilities(val_x).argmax(-1)
        for j, (action, wd) in enumerate(zip(names, decays)):
            candidates.append(Candidate(f"round 2: {action} flagged, weight decay {wd:g}", 2, 1, float(wd), action,
                                        0.0, int(r2.best_epoch[j]), (secs + cv_secs) / len(decays),
                                        r2.curves[:, j].tolist()))
            heads.append(lambda j=j: linear_head(cfg, r2.weight[j], r2.bias[j], mean, std))
            val_preds.append(r2_pred[:, j])
        log.info("round 2: %d softmax heads in %.1f s", len(decays), secs)

    for c, pred in zip(candidates, val_preds):
        c.val_accuracy = _score(pred, val_y, None)
        c.val_score = _score(pred, val_y, gain)
        if val_clean is not None and (val_clean >= 0).any():
            known = val_clean >= 0
            c.val_clean_accuracy = _score(pred[known], val_clean[known], None)
    chosen = _choose(np.stack([_row_scores(p, val_y, gain) for p in val_preds]))
    y_final, w_final = all_labels[candidates[chosen].action]
    return Search(candidates, chosen, heads[chosen](), y_final, w_final, probs, issues, gain,
                  time.perf_counter() - start)
