"""Choosing the torch device from a config value (shared by every stage)."""

from __future__ import annotations

import torch

from mcpipe.errors import ConfigError


def resolve_device(name: str, *, key: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` -> this process's GPU (``local_rank``).

    ``key`` names the config key in the error when CUDA is asked for but absent.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} = {name!r} but no CUDA device is available; use cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)
