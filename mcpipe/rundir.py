"""Run folders shared by train-head and finetune: refuse to clobber, resume only the same config, write atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mcpipe.errors import ConfigError, DataError


def check_run_dir(out: Path, config_text: str, files: tuple[str, ...], *, resume: bool, overwrite: bool) -> None:
    """Refuse, touching nothing: a file as ``out``; ``--resume`` without a checkpoint or with another config;
    a folder already holding a run (any of ``files`` besides config.toml) without ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a run folder")
    if resume:
        if not (out / "checkpoint.pt").exists():
            raise DataError(f"--resume: {out} has no checkpoint.pt to resume from")
        saved = (out / "config.toml").read_text(encoding="utf-8") if (out / "config.toml").exists() else ""
        if saved != config_text:
            raise ConfigError(f"--resume: the config differs from the one {out} was started with "
                              f"({out / 'config.toml'}); resume with the same config, or --overwrite")
        return
    present = [f for f in files if (out / f).exists() and f != "config.toml"]
    if present and not overwrite:
        raise DataError(f"{out} already holds a run ({', '.join(present)}); --resume to continue it or "
                        "--overwrite to replace it")


def start_run_dir(out: Path, config_text: str, files: tuple[str, ...], *, resume: bool, overwrite: bool) -> None:
    """``check_run_dir``, then (unless resuming) clear ``files`` and write ``config.toml``."""
    check_run_dir(out, config_text, files, resume=resume, overwrite=overwrite)
    if resume:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        (out / name).unlink(missing_ok=True)
    (out / "config.toml").write_text(config_text, encoding="utf-8")


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)
