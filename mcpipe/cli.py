"""The ``mcpipe`` command: parse, build the config, call the stage's ``run``.

No ML logic lives here. User errors (:class:`mcpipe.errors.MCPipeError`) become
one line on stderr and a non-zero exit: 2 for usage/config, 1 for data.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer
from typer.core import TyperGroup

from mcpipe.config import Config, load_config, replace
from mcpipe.errors import ConfigError, MCPipeError
from mcpipe.rundir import resume_mode
from mcpipe.stopping import Preempted

if TYPE_CHECKING:
    from mcpipe.records import FinetuneMetrics, HeadMetrics


def _resume_values(args: list[str]) -> list[str]:
    """``--resume`` alone -> ``--resume=yes``, ``--resume auto`` -> ``--resume=auto`` (click options take a value
    or none, not an optional one)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--resume":
            auto = i + 1 < len(args) and args[i + 1] == "auto"
            out.append("--resume=auto" if auto else "--resume=yes")
            i += 2 if auto else 1
        else:
            out.append(args[i])
            i += 1
    return out


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (unknown option, missing argument, bad value) as one line.

    Click would print the usage and a boxed panel; every other mcpipe error is one
    ``error: ...`` line on stderr, so these are too (exit 2). ``mcpipe`` alone
    prints the help.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        args = _resume_values(sys.argv[1:] if args is None else list(args))
        try:
            code = super().main(args or ["--help"], prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(getattr(exc, "exit_code", 1))
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="mcpipe",
    help="MetaCleaner for noisy-labelled image classification: extract features, train the head, fine-tune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_CONFIG = Path("pipeline.toml")

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config (default: ./pipeline.toml if it exists).")
SetOpt = typer.Option(None, "--set", "-s", metavar="SECTION.KEY=VALUE",
                      help="Override one config key; repeatable, e.g. --set data.limit=1000.")
LogOpt = typer.Option("info", "--log-level", help="debug, info, warning or error.")
FeaturesOpt = typer.Option(None, "--features", "-f", help="Folder with train.h5 (and test.h5); default: config key store.dir.")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")
ResumeOpt = typer.Option("no", "--resume", metavar="[auto]", show_default=False,
                         help="Continue the interrupted run in --out; --resume auto: continue it if --out holds a "
                              "checkpoint of this config, else start fresh (for requeued jobs).")
OverwriteRunOpt = typer.Option(False, "--overwrite", help="Replace a run already in --out.")
LabelsOpt = typer.Option(None, "--labels", "-l", help="CSV/TSV of id, label [, clean_label] replacing the training labels (config key labels.file), e.g. what mcpipe clean wrote.")


def _setup_logging(level: str) -> None:
    lvl = getattr(logging, level.upper(), None)
    if not isinstance(lvl, int):
        raise ConfigError(f"--log-level {level!r} is invalid: expected debug, info, warning or error")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if lvl <= logging.DEBUG
                                           else "%(message)s"))
    root = logging.getLogger("mcpipe")
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    root.propagate = False


def _config(path: Optional[Path], sets: Optional[list[str]], labels: Optional[Path] = None) -> Config:
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    cfg = load_config(path, sets or [])
    return replace(cfg, "labels", file=str(labels)) if labels is not None else cfg


def _train_config(path: Optional[Path], sets: Optional[list[str]], device: Optional[str],
                  labels: Optional[Path] = None) -> Config:
    cfg = _config(path, sets, labels)
    return replace(cfg, "train", device=device) if device is not None else cfg


def guarded(fn: Callable) -> Callable:
    """Turn user errors into one line + exit code; Ctrl-C into a resumable stop."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Preempted as exc:  # a signal, after a checkpoint: not an error, a requeue
            typer.echo(str(exc), err=True)
            raise typer.Exit(exc.exit_code) from None
        except MCPipeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: what was written is kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@guarded
def extract(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Store folder (default: config key store.dir): <out>/<split>.h5."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace stores instead of resuming or refusing them."),
    strict: Optional[bool] = typer.Option(None, "--strict/--skip-bad", help="Stop at an unreadable image / skip and record it."),
    device: Optional[str] = DeviceOpt,
    progress: bool = ProgressOpt,
    log_level: str = LogOpt,
) -> None:
    """Cache backbone features of every split in HDF5 stores (resumable; torchrun for several devices)."""
    _setup_logging(log_level)
    cfg = _config(config, set_)
    flags = {k: v for k, v in {"strict": strict, "device": device}.items() if v is not None}
    if flags:
        cfg = replace(cfg, "extract", **flags)
    from mcpipe.extract.run import run  # heavy imports (torch) only when needed

    results = run(cfg, out=out, overwrite=overwrite, progress=progress and sys.stderr.isatty())
    for r in results:
        typer.echo(_summary_line(r))


@app.command("train-head")
@guarded
def train_head(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    features: Optional[Path] = FeaturesOpt,
    out: Path = typer.Option(Path("runs/head"), "--out", "-o", help="Run folder to write."),
    labels: Optional[Path] = LabelsOpt,
    resume: str = ResumeOpt,
    overwrite: bool = OverwriteRunOpt,
    device: Optional[str] = DeviceOpt,
    progress: bool = ProgressOpt,
    log_level: str = LogOpt,
) -> None:
    """Train MetaCleaner + softmax on cached features (seconds to minutes)."""
    _setup_logging(log_level)
    cfg = _train_config(config, set_, device, labels)
    from mcpipe.cleaner.run import run

    m = run(cfg, features=features or Path(cfg.store.dir), out=out, resume=resume_mode(resume, out), overwrite=overwrite,
            progress=progress and sys.stderr.isatty())
    typer.echo(head_summary(cfg, m, out))


@app.command()
@guarded
def sweep(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    features: Optional[Path] = FeaturesOpt,
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o", help="Sweep folder: one run per point + results."),
    labels: Optional[Path] = LabelsOpt,
    device: Optional[str] = DeviceOpt,
    progress: bool = ProgressOpt,
    log_level: str = LogOpt,
) -> None:
    """Train every combination of the sweep grid (config table sweep) on features loaded once; results best first."""
    _setup_logging(log_level)
    cfg = _train_config(config, set_, device, labels)
    from mcpipe.cleaner.sweep import format_table, run

    rows = run(cfg, features=features or Path(cfg.store.dir), out=out, progress=progress and sys.stderr.isatty())
    typer.echo(format_table(rows, [k for k, _ in cfg.sweep.grid]))
    typer.echo(f"results: {out / 'results.csv'}, {out / 'results.md'}")


def head_summary(cfg: Config, m: HeadMetrics, out: Path) -> str:
    c = cfg.cleaner
    if m.search is not None:
        s = m.search
        what = (f"chose {s['chosen']} on validation (of {len(s['candidates'])} candidates"
                + (", refitted on all training rows)" if s["refit"] else ")"))
    else:
        what = ("softmax baseline (N = 1)" if c.subset_size == 1 else
                f"MetaCleaner N = {c.subset_size}, {c.weighting}")
    if m.val_accuracy is not None:
        what += f": validation accuracy {m.val_accuracy:.4f}"
    parts = [what if m.test_accuracy is None else f"{what}, test accuracy {m.test_accuracy:.4f}"]
    if m.noise_detection_auroc is not None:
        parts.append(f"noise detection AUROC {m.noise_detection_auroc:.3f} ({m.ranked_by} score)")
    parts.append(f"{m.seconds:.1f} s -> {out}")
    return "; ".join(parts)


def _summary_line(r) -> str:  # noqa: ANN001 - extract.run.SplitResult
    if r.already_done:
        return f"{r.split}: {r.rows:,} rows in {r.path}, complete already (--overwrite to extract again)"
    skipped = sum(r.skipped.values())
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(r.skipped.items()))
    state = "complete" if r.complete else "INCOMPLETE"
    return (f"{r.split}: {r.rows:,} rows -> {r.path} ({state}); {r.extracted:,} extracted in {r.seconds:.1f} s "
            f"({r.images_per_second:,.1f} img/s); {skipped} skipped" + (f" ({why})" if skipped else ""))


@app.command()
@guarded
def finetune(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    head: Optional[Path] = typer.Option(None, "--head", help="A train-head run (or its head.pt) to start the cleaner and classifier from."),
    out: Path = typer.Option(Path("runs/finetune"), "--out", "-o", help="Run folder to write."),
    labels: Optional[Path] = LabelsOpt,
    resume: str = ResumeOpt,
    overwrite: bool = OverwriteRunOpt,
    device: Optional[str] = DeviceOpt,
    progress: bool = ProgressOpt,
    log_level: str = LogOpt,
) -> None:
    """Train backbone + MetaCleaner + classifier end to end on images (torchrun for several devices)."""
    _setup_logging(log_level)
    cfg = _config(config, set_, labels)
    if device is not None:
        cfg = replace(cfg, "finetune", device=device)
    from mcpipe.finetune.run import run

    m = run(cfg, out=out, head=head, resume=resume_mode(resume, out), overwrite=overwrite,
            progress=progress and sys.stderr.isatty())
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(finetune_summary(m, out))


def finetune_summary(m: FinetuneMetrics, out: Path) -> str:
    phases = ", ".join(f"{p['name']} {p['epochs']}" for p in m.phases)
    parts = [f"{len(m.history)} epochs ({phases})"]
    if m.test_accuracy is not None:
        parts.append(f"test top-1 {m.test_accuracy:.4f}" + ("" if m.test_top5 is None else f", top-5 {m.test_top5:.4f}")
                     + f" (epoch {m.exported_epoch}, exported)")
    if m.start is not None and m.start.test_top1 is not None:
        parts.append(f"the head before fine-tuning (epoch 0): test top-1 {m.start.test_top1:.4f}")
    if m.best_epoch is not None:
        at = m.test_accuracy_at_best_epoch
        parts.append(f"best epoch by validation {m.best_epoch} (val top-1 {m.best_val_accuracy:.4f}"
                     + ("" if at is None else f", test {at:.4f} at it") + ")")
    if m.history:
        parts.append(f"{m.history[-1].images_per_second:.1f} img/s")
    parts.append(f"{m.seconds:.1f} s -> {out}/model.pt")
    return "; ".join(parts)


@app.command()
@guarded
def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files, folders of images, or CSV/TSV manifests with a path column."),
    model: Path = typer.Option(..., "--model", "-m", help="A finetune run folder (model.pt + model.json)."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="CSV to write."),
    top_k: int = typer.Option(5, "--top-k", help="Classes listed per image."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(0, "--workers", help="DataLoader processes decoding images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    progress: bool = ProgressOpt,
    log_level: str = LogOpt,
) -> None:
    """Classify images with a finetuned model; writes id, predicted class, probability and the top k."""
    _setup_logging(log_level)
    from mcpipe.finetune.predict import predict as run_predict

    r = run_predict(model, list(inputs), out, device=device, batch_size=batch_size, top_k=top_k, workers=workers,
                    progress=progress and sys.stderr.isatty())
    typer.echo(f"{r['predicted']} of {r['images']} images classified, {r['skipped']} skipped; "
               f"{r['seconds']:.1f} s -> {r['out']}")


@app.command()
@guarded
def report(
    run: Path = typer.Argument(..., help="A train-head or finetune run folder, or a sweep folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for index.html and the PNGs; default RUN/report."),
    features: Optional[Path] = FeaturesOpt,
    suspects: int = typer.Option(24, "--suspects", help="Most suspect training images on the contact sheet (0 = none)."),
    labels: Optional[Path] = typer.Option(None, "--labels", "-l", help="A label file to judge the run's scores against: its clean_label column, or its label column (e.g. a re-annotation)."),
    log_level: str = LogOpt,
) -> None:
    """Figures and an index.html: accuracy against noise, clean-score histograms, curves, confusion, suspects."""
    _setup_logging(log_level)
    from mcpipe.report.run import report as run_report

    if suspects < 0:
        raise ConfigError(f"--suspects {suspects} is invalid: expected an integer >= 0")
    w = run_report(run, out=out, features=features, suspects=suspects, labels=labels)
    typer.echo(w.summary)
    for note in w.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"{len(w.figures)} figures -> open {w.index}")


@app.command("clean")
@guarded
def clean_(
    run: Path = typer.Argument(..., help="A train-head run folder (its scores.csv and metrics.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Label file to write (CSV; TSV for a .tsv name)."),
    action: str = typer.Option("keep", "--action", help="keep, relabel or drop the flagged rows in the label column."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Share of rows flagged (lowest label_score); default: the run's estimated noise rate."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    log_level: str = LogOpt,
) -> None:
    """Turn a head run into a label file: id, given_label, suggested_label, label_score, is_label_issue, label."""
    _setup_logging(log_level)
    from mcpipe.cleaner.labelfile import clean

    c = clean(run, out, action=action, fraction=fraction, overwrite=overwrite)
    typer.echo(f"{c.flagged:,} of {c.rows:,} labels flagged ({c.fraction:.3f}, {c.fraction_from}; by {c.score}), "
               f"{action}: {c.rows:,} rows -> {c.path}" + (f" ({c.dropped:,} dropped: empty label)" if c.dropped else ""))


@app.command("import")
@guarded
def import_(
    out: Path = typer.Option(..., "--out", "-o", help="Store folder: writes <out>/<split>.h5."),
    split: str = typer.Option("train", "--split", help="Split to write: train, test, val, ..."),
    embeddings: Optional[list[Path]] = typer.Option(None, "--embeddings", "-e", help=".npy (rows, dims) float array; repeatable, concatenated in order."),
    labels: Optional[Path] = typer.Option(None, "--labels", "-l", help="CSV/TSV with id, label [, clean_label, path]; one row per embedding row."),
    clip_retrieval: Optional[Path] = typer.Option(None, "--clip-retrieval", help="clip-retrieval output: img_emb/img_emb_{i}.npy + metadata/metadata_{i}.parquet."),
    label_column: str = typer.Option("label", "--label-column", help="Metadata column holding the label (--clip-retrieval)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class names, one a line (default: sorted labels; other splits: train.h5's)."),
    dtype: str = typer.Option("float16", "--dtype", help="Feature precision on disk: float16 or float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store already in --out."),
    log_level: str = LogOpt,
) -> None:
    """Write a feature store from embeddings you already have (.npy + labels, or clip-retrieval output)."""
    _setup_logging(log_level)
    from mcpipe.importer import run_import

    r = run_import(out, split, embeddings=embeddings, labels=labels, clip_retrieval=clip_retrieval,
                   label_column=label_column, classes=classes, dtype=dtype, overwrite=overwrite)
    typer.echo(f"{r.split}: {r.rows:,} rows x {r.feature_dim} dims, {r.num_classes} classes -> {r.path} "
               f"({r.seconds:.1f} s)")


@app.command()
@guarded
def inspect(
    store: Path = typer.Argument(..., help="A store file, e.g. features/train.h5."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    allow_incomplete: bool = typer.Option(True, "--allow-incomplete/--require-complete",
                                          help="Describe a store that is still being written."),
    log_level: str = LogOpt,
) -> None:
    """Describe a feature store: size, classes, clean labels, skipped images, provenance."""
    _setup_logging(log_level)
    from mcpipe.store.reader import open_store
    from mcpipe.store.summary import describe

    summary = describe(open_store(store, allow_incomplete=allow_incomplete))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(format_summary(summary))


def _preprocessing(text: str) -> str:
    p = json.loads(text)
    if not p:  # mcpipe import and synthetic stores: no images went through mcpipe
        return "none (features not extracted by mcpipe)"
    fmt = lambda xs: "(" + ", ".join(f"{x:.3f}" for x in xs) + ")"  # noqa: E731
    return (f"resize {p['resize']} ({p['interpolation']}) -> {p.get('crop', 'center')} crop {p['image_size']}, "
            f"mean {fmt(p['mean'])}, std {fmt(p['std'])}")


def format_summary(s: dict) -> str:
    prov = s["provenance"]
    lines = [
        f"store       {s['path']}",
        f"rows        {s['rows']:,} ({s['usable_rows']:,} usable, {s['skipped']} skipped)"
        f"   complete: {'yes' if s['complete'] else 'NO'}",
        f"features    {s['feature_dim']}-d {s['dtype']}",
        f"data        {prov['dataset']} / {prov['split']}  ({prov['data_root']})"
        + ("; each row's image path recorded" if s.get("image_paths") else ""),
        f"backbone    {prov['backbone']}  weights={prov['weights']}"
        + ("  (RANDOM INIT)" if prov["random_init"] else f"  sha256={str(prov['weights_sha256'])[:16]}"),
        f"preprocess  {_preprocessing(prov['preprocessing'])}; {prov['precision']} on {prov['device']}",
        f"clean       {100 * s['known_clean_fraction']:.1f}% of rows have a known clean label"
        + (f"; given label correct on {100 * s['given_label_agreement']:.1f}% of them"
           if s["given_label_agreement"] is not None else ""),
    ]
    if "verified" in s:
        v = s["verified"]
        lines.append(f"verified    {v['correct']:,} correct, {v['wrong']:,} wrong, {v['unverified']:,} unverified")
    counts = s["class_counts"]
    lines.append(f"classes     {s['num_classes']} (rows per class: min {min(counts.values()):,}, "
                 f"max {max(counts.values()):,})")
    for name, c in counts.items():
        lines.append(f"  {c:>9,}  {name}")
    if s["skipped"]:
        lines.append("skipped     " + ", ".join(f"{n} {r}" for r, n in s["skipped_by_reason"].items()))
        for e in s["skipped_examples"]:
            lines.append(f"  {e['reason']:<10} {e['id']}")
    lines.append(f"mcpipe      {prov['mcpipe_version']} (schema {prov['schema_version']})")
    return "\n".join(lines)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
