"""The exported model of a finetune run: ``RUN/model.pt`` (a plain state_dict) + ``RUN/model.json``.

``model.json`` holds what rebuilds the network and reads images for it:
``format`` ("mcpipe-model"), ``version``, ``backbone``, ``image_size``,
``feature_dim``, ``classes``, ``head`` (the Head's keyword arguments),
``preprocessing`` (``Preprocess.to_dict``), ``provenance`` (the backbone's
weights when training started) and ``metrics`` (final test accuracy).
``model.pt`` is the ``Net``'s state_dict, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mcpipe.cleaner.model import Head
from mcpipe.errors import DataError
from mcpipe.extract.backbones import build_backbone
from mcpipe.extract.preprocess import Preprocess
from mcpipe.finetune.model import Net
from mcpipe.loading import load_problem
from mcpipe.atomic import save_atomic, write_json_atomic

MODEL_FORMAT = "mcpipe-model"
MODEL_VERSION = 1


def export_model(out: Path, net: Net, *, backbone: str, image_size: int, classes: list[str], pre: Preprocess,
                 provenance: dict, metrics: dict) -> None:
    """Write ``out/model.pt`` and ``out/model.json`` (each atomically; the state_dict first)."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    save_atomic(state, out / "model.pt")
    write_json_atomic({"format": MODEL_FORMAT, "version": MODEL_VERSION, "backbone": backbone,
                       "image_size": image_size, "feature_dim": net.head.feature_dim, "classes": list(classes),
                       "head": net.head.config(), "preprocessing": pre.to_dict(), "provenance": provenance,
                       "metrics": metrics}, out / "model.json")


def load_model(run: str | Path, device: torch.device | str = "cpu") -> tuple[Net, dict]:
    """(the exported network in eval mode on ``device``, its model.json); refuses what is not ours."""
    run = Path(run)
    meta_path, weights_path = run / "model.json", run / "model.pt"
    if not run.is_dir():
        raise DataError(f"--model {run} is not a run folder (mcpipe finetune --out writes one)")
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise DataError(f"--model {run} has no {p.name}; is it a finished mcpipe finetune run?")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path} is not JSON ({exc}); not an mcpipe model") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise DataError(f"{meta_path} is not an mcpipe model description (format {meta.get('format')!r} "
                        f"if a dict; expected {MODEL_FORMAT!r})" if isinstance(meta, dict) else
                        f"{meta_path} is not an mcpipe model description")
    if meta.get("version") != MODEL_VERSION:
        raise DataError(f"{meta_path} has model version {meta.get('version')!r}; this mcpipe reads {MODEL_VERSION}")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled objects weights_only refuses
        raise DataError(f"{weights_path} cannot be loaded as a plain state_dict: {load_problem(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{weights_path} is not a state_dict of tensors")
    try:
        backbone = build_backbone(meta["backbone"], "none", image_size=int(meta["image_size"]), warn_random=False)
        net = Net(backbone, Head(**meta["head"]))
        net.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{run}: model.json and model.pt do not describe one network: "
                        f"{load_problem(exc)}") from None
    return net.to(device).eval(), meta
