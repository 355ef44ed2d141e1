"""``mcpipe report RUN|SWEEP``: figures and an ``index.html`` for a head run, a finetune run or a sweep.

A run gets: training curves, the score histograms of known-clean vs
known-flipped images (head runs), the test confusion matrix, and a contact
sheet of the most suspect training images read back from the image source
the store points to. A sweep gets the accuracy / AUROC against noise rate
figure (one line per subset size N), its results table, and a section with
the figures of every run. Written to ``RUN/report/`` unless ``--out``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcpipe.cleaner.metrics import detection as detection_of
from mcpipe.errors import DataError
from mcpipe.labels import read_label_file
from mcpipe.report import figures
from mcpipe.report.collect import Run, Scores, Sweep, is_sweep, read_run, read_scores, read_sweep
from mcpipe.report.images import load_images
from mcpipe.report.page import Section, Table, write_page
from mcpipe.records import FinetuneMetrics, HeadMetrics
from mcpipe.tables import align_columns

log = logging.getLogger(__name__)

SCORE_NAMES = {"alpha": "clean score α (MetaCleaner)", "classifier": "classifier score p(given label | image)"}


@dataclass
class Written:
    """What ``report`` wrote, and the lines to print."""

    index: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: str = ""


@dataclass(frozen=True)
class Options:
    """What the command line asks of every run's section."""

    features: Path | None = None   # the store folder, when not where the run recorded it
    suspects: int = 24             # images on the contact sheet
    labels: Path | None = None     # a label file to judge the scores against (its clean_label, else its label)


def report(path: str | Path, *, out: str | Path | None = None, features: str | Path | None = None,
           suspects: int = 24, labels: str | Path | None = None) -> Written:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: give a run folder (train-head, finetune --out) or a sweep folder")
    out = Path(out) if out is not None else path / "report"
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    opts = Options(Path(features) if features is not None else None, suspects,
                   Path(labels) if labels is not None else None)
    if opts.labels is not None and not opts.labels.is_file():
        raise DataError(f"label file {opts.labels} does not exist")
    if is_sweep(path):
        sweep = read_sweep(path)  # read everything before writing anything
        out.mkdir(parents=True, exist_ok=True)
        return _sweep_report(sweep, out, opts)
    run = read_run(path)
    out.mkdir(parents=True, exist_ok=True)
    written = Written(out / "index.html")
    section = _run_section(run, out, "", opts, written)
    write_page(written.index, f"mcpipe report: {run.name} ({run.kind} run)", [section], source=path.resolve())
    written.summary = _run_summary(run)
    return written


# ---- one run ---------------------------------------------------------------------------------------------


def _run_section(run: Run, out: Path, rel: str, opts: Options, written: Written) -> Section:
    """Draw a run's figures into ``out`` (page-relative prefix ``rel``) and describe them."""
    s = Section(f"{run.name}", facts=_facts(run), config_text=run.config_text)

    def add(png: Path, caption: str) -> None:
        written.figures.append(png)
        s.figures.append((f"{rel}{png.name}", caption))

    def note(text: str) -> None:
        s.notes.append(text)
        written.notes.append(f"{run.name}: {text}")

    if run.metrics.history:
        add(figures.training_curves(run.metrics.history, out / "training_curves.png"),
            "Training loss (on the noisy labels) and test accuracy per epoch.")
    else:
        note("no epoch finished: no training curves")
    if run.scores is not None:
        _scores_figures(run, out, opts, add, note)
    elif run.kind == "finetune":
        note("finetune runs keep no per-image scores: the score histograms and the suspect images come from "
             "train-head runs (mcpipe report on the head run given to --head)")
    else:
        note("no scores.csv in the run folder: no score histograms or suspect images")
    if run.confusion is not None:
        counts, classes = run.confusion
        add(figures.confusion(counts, classes, out / "confusion.png"),
            "Test split: rows are true classes, columns predicted classes; colour = share of the true class.")
        s.tables.append(confused_pairs(counts, classes))
    else:
        note("no confusion.csv: the run had no test split (or was made by an mcpipe without it)")
    return s


def confused_pairs(counts: np.ndarray, classes: list[str], top: int = 10) -> Table:
    """The ``top`` most frequent test errors (true class -> predicted class), most frequent first."""
    errors = np.array(counts, dtype=np.int64)
    np.fill_diagonal(errors, 0)
    order = np.argsort(-errors, axis=None, kind="stable")[:top]
    rows = []
    for flat in order:
        i, j = divmod(int(flat), len(classes))
        if errors[i, j] == 0:
            break
        total = max(int(counts[i].sum()), 1)
        rows.append([classes[i], classes[j], f"{errors[i, j]:,}", f"{100 * errors[i, j] / total:.1f}%"])
    return Table(["true class", "predicted as", "test images", "share of the true class"], rows)


def _facts(run: Run) -> list[tuple[str, str]]:
    m = run.metrics
    head = m if isinstance(m, HeadMetrics) else None  # what only train-head measures
    facts = [("kind", run.kind)]
    if run.subset_size is not None:
        facts.append(("subset size N", f"{run.subset_size}" + (" (softmax baseline)" if run.subset_size == 1 else "")))
    if m.noise is not None:
        facts.append(("label noise", f"{m.noise.kind} at rate {m.noise.rate} (realised {m.noise.realized_rate:.3f})"))
    if head and head.search is not None:
        s = head.search
        facts.append(("chosen on validation", f"{s['chosen']} (of {len(s['candidates'])} "
                                              f"candidates{', refitted on all training rows' if s['refit'] else ''})"))
    if head and head.label_issues is not None:
        li = head.label_issues
        facts.append(("labels flagged by the second round", f"{li.flagged:,} ({li.estimated_noise_rate:.1%})"
                      + ("" if li.precision is None else f", precision {li.precision:.3f}, recall {li.recall:.3f}")))
    numbers = [("training images", m.train_images, ","), ("test images", head and head.test_images, ","),
               ("validation accuracy (given labels)", head and head.val_accuracy, ".4f"),
               ("validation accuracy (true labels, reported only)", head and head.val_clean_accuracy, ".4f"),
               ("test top-1 accuracy", m.test_accuracy, ".4f"),
               ("test top-5 accuracy", m.test_top5 if isinstance(m, FinetuneMetrics) else None, ".4f"),
               ("training time", m.seconds, ".1f")]
    facts += [(name, format(value, fmt) + (" s" if name == "training time" else ""))
              for name, value, fmt in numbers if value is not None]
    for name, d in ((head.detection or {}) if head else {}).items():
        facts.append((f"noise detection by {name} score", f"AUROC {d.auroc:.3f}, average precision "
                                                         f"{d.average_precision:.3f} ({d.flipped:,} flipped "
                                                         f"of {d.known:,} known)"))
    return facts


def _judged_by(scores: Scores, path: Path) -> Scores:
    """``scores`` with the truth taken from a label file: its clean_label column (empty = unknown), or, in a
    file without one, its label column (a re-annotation)."""
    names = sorted({x for x in (*scores.given, *scores.predicted, *scores.clean) if x})
    file = read_label_file(path, scores.ids, names, what="the run's scores.csv")
    truth = file.clean_labels if file.clean_labels is not None else file.labels
    clean = [names[t] if t >= 0 else "" for t in truth]
    known = (truth >= 0) & np.array([g != "" for g in scores.given])
    wrong = known & np.array([g != c for g, c in zip(scores.given, clean)])
    return dataclasses.replace(scores, clean=clean, known=known, wrong=wrong)


def _scores_figures(run: Run, out: Path, opts: Options, add, note) -> None:  # noqa: ANN001
    scores = read_scores(run.scores)
    detection = (run.metrics.detection if isinstance(run.metrics, HeadMetrics) else None) or {}
    if opts.labels is not None:
        scores = _judged_by(scores, opts.labels)
        detection = {name: detection_of(values, scores.known, scores.wrong)
                     for name, values in (("alpha", scores.alpha), ("classifier", scores.classifier))}
        note(f"known-right and known-wrong labels from {opts.labels}, not from the run")
    known, flipped = scores.known, scores.wrong
    panels = []
    names = ["alpha", "classifier"] if (run.subset_size or 1) > 1 else ["classifier"]
    if known.any() and flipped.any() and not flipped[known].all():
        for name in names:
            values = scores.alpha if name == "alpha" else scores.classifier
            found = detection.get(name)
            panels.append(figures.ScorePanel(SCORE_NAMES[name], "score (higher = label looks right)",
                                             values[known & ~flipped], values[flipped],
                                             None if found is None else found.auroc))
        add(figures.score_histograms(panels, out / "scores.png"),
            "How well each score separates images whose given label is known right from those known flipped.")
        if "alpha" not in names:
            note("N = 1 (softmax baseline): no cleaner, so no α; only the classifier score is shown")
    else:
        note("no image has both a known-clean and a known-flipped label: no score histograms "
             "(train with noise.kind other than none, or on a data set with verified labels)")
    _suspects(run, scores, known, flipped, out, opts.features, opts.suspects, add, note)


def _suspects(run: Run, scores, known, flipped, out: Path, features: Path | None, k: int, add, note) -> None:  # noqa: ANN001
    if k <= 0:
        return
    recorded = run.metrics.features if isinstance(run.metrics, HeadMetrics) else None
    features = features or Path(recorded or run.config.get("store", {}).get("dir", "features"))
    ids = scores.ids[:k]
    pixels, why = load_images(features / "train.h5", ids)
    if why is not None:
        note(f"suspect images not shown: {why}")
        return
    tiles = []
    for i, px in enumerate(pixels):
        if px is None:
            continue
        lines = [f"#{i + 1} {ids[i]}"[:28], f"given: {scores.given[i]}"[:28], f"model: {scores.predicted[i]}"[:28]]
        if scores.clean[i]:
            lines.append(f"true: {scores.clean[i]}"[:28])
        elif known[i]:
            lines.append("checked: " + ("wrong" if flipped[i] else "right"))
        tiles.append(figures.Tile(px, tuple(lines), bool(flipped[i]) if known[i] else None))
    ranked_by = (run.metrics.ranked_by if isinstance(run.metrics, HeadMetrics) else None) or "classifier"
    shown = [i for i, px in enumerate(pixels) if px is not None]
    title = f"The {len(tiles)} most suspect training images (lowest {ranked_by} score first)"
    if known[shown].any():
        title += (f": {int(flipped[shown].sum())} of the {int(known[shown].sum())} whose label is known are wrong"
                  "\n(red frame = given label known wrong, green = known right)")
    add(figures.contact_sheet(tiles, out / "suspects.png", title=title),
        f"Most suspect training images, read from the images the store {features / 'train.h5'} was extracted from.")
    if len(tiles) < len(ids):
        note(f"{len(ids) - len(tiles)} of the {len(ids)} suspect images could not be read and are left out")


def _run_summary(run: Run) -> str:
    m = run.metrics
    parts = [f"{run.name}: {run.kind} run"]
    if m.test_accuracy is not None:
        parts.append(f"test top-1 {m.test_accuracy:.4f}")
    if isinstance(m, HeadMetrics) and m.noise_detection_auroc is not None:
        parts.append(f"noise-detection AUROC {m.noise_detection_auroc:.3f} ({m.ranked_by} score)")
    return ", ".join(parts)


# ---- a sweep ---------------------------------------------------------------------------------------------


def _value(run: Run, key: str):  # noqa: ANN202
    section, name = key.split(".", 1)
    return run.config.get(section, {}).get(name)


def _series_name(key: str, value) -> str:  # noqa: ANN001
    if key == "cleaner.subset_size":
        return f"N = {value}" + (" (softmax baseline)" if value == 1 else " (MetaCleaner)")
    return f"{key.split('.', 1)[1]} = {value}"


def _axes(sweep: Sweep) -> tuple[str | None, list[str]]:
    """(key on the x axis, keys that tell the lines apart): noise.rate on x when it varies."""
    keys = list(dict.fromkeys([*sweep.keys, "noise.rate", "cleaner.subset_size"]))
    varying = [k for k in keys if len({repr(_value(r, k)) for r in sweep.runs}) > 1]
    if not varying:
        return None, []
    x = "noise.rate" if "noise.rate" in varying else next((k for k in varying if k != "cleaner.subset_size"),
                                                          varying[0])
    return x, [k for k in varying if k != x]


def _series(run: Run, keys: list[str]) -> str:
    return ", ".join(_series_name(k, _value(run, k)) for k in keys) or "all runs"


def pivot(sweep: Sweep) -> Table:
    """Test accuracy (noise-detection AUROC) with one row per x value and one column per line."""
    x, keys = _axes(sweep)
    if x is None:
        return Table(["run", "test accuracy (AUROC)"], [[r.name, _cell(r)] for r in sweep.runs])
    columns = list(dict.fromkeys(_series(r, keys) for r in sweep.runs))
    xs = sorted({_value(r, x) for r in sweep.runs}, key=lambda v: (isinstance(v, str), v))
    rows = []
    for v in xs:
        cells = {_series(r, keys): _cell(r) for r in sweep.runs if _value(r, x) == v}
        rows.append([str(v), *(cells.get(c, "-") for c in columns)])
    return Table([x, *columns], rows)


def _cell(run: Run) -> str:
    acc = "-" if run.test_accuracy is None else f"{run.test_accuracy:.4f}"
    return acc + ("" if run.auroc is None else f" ({run.auroc:.3f})")


def _sweep_report(sweep: Sweep, out: Path, opts: Options) -> Written:
    written = Written(out / "index.html")
    x, keys = _axes(sweep)
    table = pivot(sweep)
    ranked = {r.metrics.ranked_by for r in sweep.runs if isinstance(r.metrics, HeadMetrics)} - {None}
    overview = Section(f"Sweep over {', '.join(sweep.keys) or 'one point'}: {len(sweep.runs)} runs",
                       tables=[table], config_text=sweep.config_text)
    overview.facts.append(("cells", "test top-1 accuracy (noise-detection AUROC of the "
                                    f"{'/'.join(sorted(ranked)) or 'classifier'} score)"))
    if x is not None:
        numeric = all(isinstance(_value(r, x), (int, float)) for r in sweep.runs)
        if numeric:
            points = [figures.Point(float(_value(r, x)), _series(r, keys), r.test_accuracy, r.auroc)
                      for r in sweep.runs]
            label = "training labels flipped (%)" if x == "noise.rate" else x
            png = figures.accuracy_vs_noise(points, out / "accuracy_vs_noise.png", x_label=label,
                                            percent_x=x == "noise.rate", score="/".join(sorted(ranked)) or "classifier")
            written.figures.append(png)
            overview.figures.append((png.name, f"Test accuracy and noise-detection AUROC against {x}, "
                                               "one line per " + (", ".join(keys) or "sweep")))
        else:
            overview.notes.append(f"{x} is not numeric: no line figure, see the table")
    sections = [overview]
    for run in sweep.runs:
        run_out = out / run.name
        run_out.mkdir(exist_ok=True)
        sections.append(_run_section(run, run_out, f"{run.name}/", opts, written))
    write_page(written.index, f"mcpipe report: sweep {sweep.path.name}", sections, source=sweep.path.resolve())
    title = f"test top-1 accuracy (noise-detection AUROC) by {x or 'run'}" + (f" and {', '.join(keys)}" if keys else "")
    written.summary = title + "\n" + align_columns(table.header, table.rows)
    return written
