"""Reading torch files a user hands us: failures of safe loads as one line.

Every ``torch.load`` in mcpipe uses ``weights_only=True``, so a file that pickles
arbitrary objects is refused rather than run. torch's messages for that (and
for truncated files and ``load_state_dict`` mismatches) run to many lines and,
for a pickled object, advise loading the file unsafely; :func:`load_problem`
keeps what names the problem, for a one-line :class:`mcpipe.errors.DataError`.
"""

from __future__ import annotations

import errno
import pickle
import re

import torch

from mcpipe.errors import DataError

_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.+)")
_ZIP = re.compile(r"PytorchStreamReader failed ([^.]+)")
_STATE_DICT_DETAIL = ("size mismatch", "Unexpected key", "Missing key")  # the most telling first
_MAX_CHARS = 300  # a missing-keys line can list every parameter of a ResNet


def _clip(line: str) -> str:
    line = line.strip().rstrip(".")
    return line if len(line) <= _MAX_CHARS else line[:_MAX_CHARS - 3] + "..."


def load_problem(exc: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` or ``load_state_dict`` failed."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if found := _GLOBAL.search(text):
        return f"it pickles {found.group(1)}, which safe (weights_only) loading refuses"
    if detail := [line for start in _STATE_DICT_DETAIL for line in lines if line.startswith(start)]:
        return _clip(detail[0])
    if found := _UNPICKLER.search(text):
        return _clip(f"not a torch file, or one that safe (weights_only) loading refuses ({found.group(1)})")
    if found := _ZIP.search(text):
        return f"not a complete torch file ({found.group(1).strip()}): truncated, or not written by torch.save"
    if isinstance(exc, pickle.UnpicklingError):
        return _clip(f"not a torch file ({first})")
    if isinstance(exc, EOFError) or (isinstance(exc, OSError) and exc.errno == errno.EINVAL):
        return _clip(f"not a complete torch file ({first if str(exc) else 'it ends early'}): truncated?")
    return _clip(first)


def load_state_checked(module: torch.nn.Module, state: object, *, what: str, hint: str = "") -> None:
    """``module.load_state_dict(state)`` (strict); DataError "``what`` does not fit: ...[; ``hint``]" when it fails."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{what} does not fit: {load_problem(exc)}" + (f"; {hint}" if hint else "")) from None
