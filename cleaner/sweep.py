"""``mcpipe sweep``: every combination of the ``[sweep]`` grid, in one process.

Features and kNN graphs are loaded once (``prepare``); each point trains
into ``OUT/<nn>-<key=value,...>/`` like ``mcpipe train-head``. Results go
to ``OUT/results.csv`` and ``OUT/results.md``, best *validation* accuracy
first (each point's accuracy on its validation split against the given
labels: nothing is chosen on the test split); the first row is the point the
sweep chooses (``chosen`` = ``*``), test accuracy is shown beside it.
Points already finished (their ``metrics.json`` exists with the same
config) are read back instead of retrained, and a point stopped midway with
its checkpoint (SIGTERM/SIGUSR1, see ``mcpipe.stopping``) is resumed, so an
interrupted sweep continues where it was when run again.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import re
from pathlib import Path

from mcpipe.atomic import write_text_atomic
from mcpipe.cleaner.prepare import needs_graph, prepare
from mcpipe.cleaner.run import RUN_SECTIONS, run_config_text, train_head
from mcpipe.config import Config, with_overrides
from mcpipe.errors import ConfigError, DataError
from mcpipe.faults import pause_at
from mcpipe.records import HeadMetrics, read_metrics
from mcpipe.stopping import stop_on_signals
from mcpipe.tables import align_columns

log = logging.getLogger(__name__)


def grid_points(cfg: Config) -> list[dict]:
    """The grid's combinations as ``{"section.key": value}`` dicts, in grid order."""
    if not cfg.sweep.grid:
        raise ConfigError("[sweep] is empty: give at least one key with a list of values, "
                          "e.g. --set 'sweep.cleaner.subset_size=[1, 2, 4]'")
    keys = [k for k, _ in cfg.sweep.grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in cfg.sweep.grid))]


def _slug(i: int, point: dict) -> str:
    text = ",".join(f"{k.split('.', 1)[1]}={v}" for k, v in point.items())
    return f"{i:03d}-" + re.sub(r"[^A-Za-z0-9_.,=-]+", "_", text)[:120]


def run(cfg: Config, *, features: str | Path, out: str | Path, progress: bool = False) -> list[dict]:
    out = Path(out)
    points = grid_points(cfg)
    prep = prepare(cfg, features, graph=any(needs_graph(with_overrides(cfg, p)) for p in points))
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_config_text(cfg, prep.train, ("store", *RUN_SECTIONS, "sweep")), out / "config.toml")
    rows = []
    with stop_on_signals("run the same sweep command again to continue (a point stopped midway resumes)") as stop:
        for i, point in enumerate(points):
            point_cfg = with_overrides(cfg, point)
            run_dir = out / _slug(i, point)
            config_text = run_config_text(point_cfg, prep.train)
            metrics = _finished(run_dir, config_text)
            if metrics is None:
                resume = _started(run_dir, config_text)
                log.info("sweep %d/%d: %s%s", i + 1, len(points), point, " (resumed)" if resume else "")
                metrics = train_head(point_cfg, prep, run_dir, resume=resume, overwrite=not resume,
                                     progress=progress, stop=stop)
            rows.append(_row(point, metrics, run_dir))
            if stop.requested and i + 1 < len(points):  # this point finished: stop before the next
                raise stop.preempted(f"{i + 1} of {len(points)} points finished in {out}")
    rows.sort(key=lambda r: -(r["val_accuracy"] if r["val_accuracy"] is not None else -1))  # stable: grid order on ties
    for i, r in enumerate(rows):
        r["chosen"] = "*" if i == 0 and r["val_accuracy"] is not None else ""
    _write(out, rows, [k for k, _ in cfg.sweep.grid])
    return rows


def _row(point: dict, metrics: HeadMetrics, run_dir: Path) -> dict:
    return {**point, "val_accuracy": metrics.val_accuracy, "test_accuracy": metrics.test_accuracy,
            "noise_detection_auroc": metrics.noise_detection_auroc, "seconds": metrics.seconds, "run": run_dir.name}


def _started(run_dir: Path, config_text: str) -> bool:
    """Whether ``run_dir`` holds a checkpoint of this point's config (a point stopped midway)."""
    try:
        return (run_dir / "checkpoint.pt").is_file() and \
            (run_dir / "config.toml").read_text(encoding="utf-8") == config_text
    except OSError:
        return False


def _finished(run_dir: Path, config_text: str) -> HeadMetrics | None:
    try:
        same = (run_dir / "config.toml").read_text(encoding="utf-8") == config_text
        metrics = read_metrics(run_dir / "metrics.json") if same else None
    except (OSError, DataError):
        return None
    return metrics if isinstance(metrics, HeadMetrics) else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _write(out: Path, rows: list[dict], keys: list[str]) -> None:
    cols = ["chosen", *keys, "val_accuracy", "test_accuracy", "noise_detection_auroc", "seconds", "run"]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(table.getvalue(), out / "results.csv")
    pause_at("sweep_results")  # (tests: a kill here leaves results.csv new and results.md not yet)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) if c != "seconds" else f"{r[c]:.1f}" for c in cols) + " |" for r in rows]
    write_text_atomic("\n".join(lines) + "\n", out / "results.md")


def format_table(rows: list[dict], keys: list[str]) -> str:
    head = ["", *keys, "val_acc", "test_acc", "auroc", "seconds"]
    body = [[r["chosen"]] + [_fmt(r[k]) for k in keys] + [_fmt(r["val_accuracy"]), _fmt(r["test_accuracy"]),
                                                         _fmt(r["noise_detection_auroc"]), f"{r['seconds']:.1f}"]
            for r in rows]
    return align_columns(head, body) + "\n(* chosen on validation accuracy; test accuracy is only reported)"
