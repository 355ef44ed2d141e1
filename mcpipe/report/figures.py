"""The report's figures: each function takes plain arrays and writes one PNG.

Matplotlib's object API with the Agg canvas (``Figure`` + ``savefig``): no
pyplot, no display, no global figure state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mcpipe.records import Epoch

DPI = 110
CLEAN, FLIPPED, UNKNOWN = "#2b8a3e", "#c92a2a", "#868e96"


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


@dataclass(frozen=True)
class Point:
    """One run of a sweep: where it sits on the x axis, which line it belongs to, what it scored."""

    x: float
    series: str
    accuracy: float | None
    auroc: float | None


def accuracy_vs_noise(points: list[Point], path: Path, *, x_label: str, percent_x: bool,
                      score: str = "classifier") -> Path:
    """Test accuracy and noise-detection AUROC against ``x`` (the paper's Fig. 4), one line per series."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    acc_ax, auc_ax = fig.subplots(1, 2)
    scale = 100 if percent_x else 1
    for series in sorted({p.series for p in points}, key=_natural):
        mine = sorted((p for p in points if p.series == series), key=lambda p: p.x)
        xs = [p.x * scale for p in mine]
        acc_ax.plot(xs, [np.nan if p.accuracy is None else 100 * p.accuracy for p in mine], "o-", label=series)
        auc_ax.plot(xs, [np.nan if p.auroc is None else p.auroc for p in mine], "o-", label=series)
    acc_ax.set(title="Test accuracy", xlabel=x_label, ylabel="test top-1 accuracy (%)")
    auc_ax.set(title=f"Finding the flipped labels by the {score} score", xlabel=x_label,
               ylabel="noise-detection AUROC (0.5 = chance)")
    for ax in (acc_ax, auc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_xticks(sorted({p.x * scale for p in points}))
    return _save(fig, path)


def _natural(text: str) -> tuple:
    """Sort "N = 10" after "N = 4"."""
    digits = "".join(ch for ch in text if ch.isdigit() or ch == ".")
    try:
        return (0, float(digits), text)
    except ValueError:
        return (1, 0.0, text)


@dataclass(frozen=True)
class ScorePanel:
    """One score's values for images whose label is known clean or known flipped."""

    title: str
    x_label: str
    clean: np.ndarray
    flipped: np.ndarray
    auroc: float | None


def score_histograms(panels: list[ScorePanel], path: Path) -> Path:
    """Each score's distribution on known-clean vs known-flipped images (the paper's Fig. 5)."""
    fig = Figure(figsize=(4.6 * len(panels), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, p in zip(axes, panels):
        both = np.concatenate([p.clean, p.flipped])
        lo, hi = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 41)
        for values, colour, name in ((p.clean, CLEAN, "label known right"), (p.flipped, FLIPPED, "label known wrong")):
            if len(values):
                ax.hist(values, bins=bins, weights=np.full(len(values), 100 / len(values)), color=colour,
                        alpha=0.55, label=f"{name} ({len(values):,} images)")
        auroc = "n/a" if p.auroc is None else f"{p.auroc:.3f}"
        ax.set(title=f"{p.title}\nnoise-detection AUROC {auroc}", xlabel=p.x_label,
               ylabel="share of the group's images (%)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def training_curves(rows: list[Epoch], path: Path) -> Path:
    """Training loss and accuracy per epoch (validation and test); the best epoch, chosen on validation top-1
    only, marked; finetune phases shaded and named. Runs without validation keys get no best-epoch mark."""
    epochs = [h.epoch for h in rows]
    style = "o-" if len(epochs) <= 30 else "-"
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [np.nan if h.loss is None else h.loss for h in rows], style, color="#1c7ed6")
    loss_ax.set(title="Training loss", xlabel="epoch", ylabel="cross-entropy (given noisy labels)")
    validated = _accuracy_curves(acc_ax, rows, style)
    acc_ax.set(title="Validation and test accuracy" if validated else "Test accuracy", xlabel="epoch",
               ylabel="top-1 accuracy (%)" if validated else "test accuracy (%)")
    phases = [h.phase for h in rows]
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(set(phases) - {None}) > 1:
            _shade_phases(ax, epochs, phases)
    return _save(fig, path)


def _accuracy_curves(ax, rows: list[Epoch], style: str) -> bool:  # noqa: ANN001 - matplotlib Axes
    """Test top-1/top-5, validation top-1 (given and clean labels) per epoch, and the best epoch by validation
    top-1 (ties: the earlier); True when the history has validation numbers."""
    tested = [h for h in rows if h.test_top1 is not None]
    validated = [h for h in rows if h.val_top1 is not None]
    if not tested and not validated:
        ax.text(0.5, 0.5, "no validation or test split: accuracy not measured", ha="center", va="center",
                transform=ax.transAxes)
        return False
    curves = (("test top-1", tested, lambda h: h.test_top1, "#e8590c", style),
              ("test top-5", tested, lambda h: h.test_top5, "#9c36b5", style.replace("o", "s") + "-"),
              ("val top-1, given labels", validated, lambda h: h.val_top1, "#0c8599", style),
              ("val top-1, clean labels", validated, lambda h: h.val_clean_top1, "#0c8599", style.replace("-", ":")))
    for name, chosen, value, colour, line in curves:
        values = [100 * v if (v := value(h)) is not None else np.nan for h in chosen]
        if chosen and not np.isnan(values).all():
            ax.plot([h.epoch for h in chosen], values, line, color=colour, label=f"{name} (last {values[-1]:.2f}%)")
    if validated:
        best = max(validated, key=lambda h: h.val_top1)  # first of equals: the earlier
        ax.axvline(best.epoch, color="black", linestyle="--", linewidth=1,
                   label=f"best epoch by val top-1: {best.epoch}"
                         + ("" if best.test_top1 is None else f" (test top-1 there {100 * best.test_top1:.2f}%)"))
        ax.plot([best.epoch], [100 * best.val_top1], "*", markerfacecolor="none", markeredgecolor="black",
                markersize=16)
    ax.legend(fontsize="small", loc="best")
    return bool(validated)


def _shade_phases(ax, epochs: list[int], phases: list[str]) -> None:  # noqa: ANN001 - matplotlib Axes
    """Every other phase shaded grey, each phase named above the plot."""
    spans, start = [], 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            spans.append((epochs[start], epochs[i - 1], phases[start]))
            start = i
    for k, (first, last, name) in enumerate(spans):
        if k % 2:
            ax.axvspan(first - 0.5, last + 0.5, color="#adb5bd", alpha=0.2)
        ax.text((first + last) / 2, 0.98, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize="small", color="#495057")


def confusion(counts: np.ndarray, classes: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix of the test split (share of each true class), with its counts."""
    counts = np.asarray(counts, dtype=np.int64)
    c = len(classes)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(100 * counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = min(14.0, 3.5 + 0.4 * c) if c <= 30 else 12.0
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of the true class's test images")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set(title=f"Confusion matrix, test split: {counts.sum():,} images, top-1 {100 * accuracy:.2f}%",
           xlabel="predicted class", ylabel="true class")
    if c <= 40:
        ax.set_xticks(range(c), classes, rotation=60, ha="right", fontsize="small" if c <= 15 else "x-small")
        ax.set_yticks(range(c), classes, fontsize="small" if c <= 15 else "x-small")
    else:
        ax.set(xlabel="predicted class (index)", ylabel="true class (index)")
    if c <= 15:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, f"{counts[i, j]}", ha="center", va="center", fontsize="x-small",
                            color="white" if share[i, j] > 55 else "black")
    return _save(fig, path)


@dataclass(frozen=True)
class Tile:
    """One suspect image: pixels (H, W, 3) uint8, its caption lines, and whether its label is known wrong."""

    pixels: np.ndarray
    lines: tuple[str, ...]
    flipped: bool | None  # True known wrong, False known right, None unknown


def contact_sheet(tiles: list[Tile], path: Path, *, title: str, columns: int = 6) -> Path:
    """Images in a grid, each framed red (label known wrong), green (known right) or grey (unknown)."""
    rows = max(1, -(-len(tiles) // columns))
    fig = Figure(figsize=(2.0 * columns, 2.45 * rows + 0.7), layout="constrained")
    fig.suptitle(title)
    axes = np.atleast_1d(fig.subplots(rows, columns)).reshape(-1)
    for ax in axes:
        ax.set_axis_off()
    for ax, tile in zip(axes, tiles):
        ax.set_axis_on()
        ax.imshow(tile.pixels, cmap="gray" if tile.pixels.ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        colour = UNKNOWN if tile.flipped is None else FLIPPED if tile.flipped else CLEAN
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)
        ax.set_title("\n".join(tile.lines), fontsize="x-small", color=colour)
    return _save(fig, path)
