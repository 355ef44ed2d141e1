"""timm backbones: ``extract.backbone = "timm:<model name>"``, the pooled features of any timm model.

``<model name>`` is a timm model name, with or without its pretrained tag:
``timm:vit_small_patch14_dinov2.lvd142m``, ``timm:convnext_tiny``,
``timm:vit_base_patch16_clip_224.openai``. The network is
``timm.create_model(name, num_classes=0)``, whose forward returns the (B, D)
pooled features (D = the model's ``head_hidden_size``, its ``num_features``
for most models; a CLIP ViT's features are the image tower's, before the
projection). mcpipe never downloads timm weights; ``weights`` is one of

* ``"none"``: random initialisation (seed 0, the global RNG is left alone);
* ``"DEFAULT"`` (or ``"pretrained"``): the tag's weights, found only in the
  local Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``) or, for weights timm takes from a URL rather
  than the hub, the torch hub cache (``$TORCH_HOME/hub/checkpoints``);
* a local timm-format state_dict: a file (``model.safetensors`` or
  ``pytorch_model.bin`` of ``huggingface.co/timm/<model name>``, or
  ``torch.save(model.state_dict())`` of the timm model) or a folder holding
  one. Classifier keys are dropped; everything else must fit strictly.

Preprocessing comes from the model's pretrained config (mean, std,
interpolation, crop_pct), read without building the network: :func:`data_config`.
A model with a fixed input size (ViTs) is built at its native size with
``dynamic_img_size`` when ``extract.image_size`` differs, so its position
embeddings keep the shape the weights have and are interpolated at run time.

timm is an optional extra, imported only when a timm backbone is used.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import torch
from torch import nn

from mcpipe.errors import ConfigError, DataError
from mcpipe.extract.backbones import TIMM_PREFIX, Backbone, load_weights, read_state_dict, weights_path
from mcpipe.hashing import sha256_file

log = logging.getLogger(__name__)

_INIT_SEED = 0  # as for the other backbones
_TIMM_HINT = "pip install 'mcpipe[timm]'"
_PRETRAINED_NAMES = ("DEFAULT", "PRETRAINED")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold, in timm's order


@dataclass(frozen=True)
class TimmDataConfig:
    """A timm model's eval preprocessing, from its pretrained config."""

    input_size: int
    """The native (trained) square input side."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    """Center-crop fraction: resize the shorter side to image_size / crop_pct, then crop image_size."""


def _import_timm(backbone: str) -> ModuleType:
    try:
        import timm
    except ImportError:
        raise DataError(f"backbone {backbone} needs the optional extra: {_TIMM_HINT}") from None
    return timm


def model_name(backbone: str) -> str:
    """The timm model name of ``"timm:<model name>"``, checked against timm's registry (``ConfigError``)."""
    timm = _import_timm(backbone)
    name = backbone[len(TIMM_PREFIX):] if backbone.startswith(TIMM_PREFIX) else backbone
    if not name or ":" in name or "/" in name:
        raise ConfigError(f"backbone {backbone!r} is invalid: expected {TIMM_PREFIX}<timm model name>, e.g. "
                          f"{TIMM_PREFIX}convnext_tiny (hub ids are not fetched: download the weights, pass the path)")
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models() lists them"
        raise ConfigError(f"unknown timm model {arch!r} in backbone {backbone!r}{hint}")
    if tag and not timm.list_pretrained(name):
        tags = [m.partition(".")[2] for m in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(f"timm model {arch} has no pretrained tag {tag!r}; "
                          f"its tags: {', '.join(tags) if tags else 'none'}")
    return name


def _pretrained_cfg(name: str) -> dict:
    """The pretrained config timm uses for the model ``name`` (its tag's, or the default tag's); {} if none."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def data_config(backbone: str) -> TimmDataConfig:
    """The eval preprocessing of ``backbone`` ("timm:<model name>") from its pretrained config, no network built."""
    cfg = _pretrained_cfg(model_name(backbone))
    from timm.data import resolve_data_config

    d = resolve_data_config(pretrained_cfg=cfg) if cfg else resolve_data_config({"input_size": (3, 224, 224)})
    return TimmDataConfig(input_size=int(d["input_size"][-1]), mean=tuple(float(m) for m in d["mean"]),
                          std=tuple(float(s) for s in d["std"]), interpolation=str(d["interpolation"]),
                          crop_pct=float(d["crop_pct"]))


# ------------------------------------------------------------------ building

def build_timm_backbone(backbone: str, weights: str, *, image_size: int, warn_random: bool = True) -> Backbone:
    """The pooled-feature network of ``backbone`` ("timm:<model name>") with ``weights`` (module docstring).

    Raises:
        ConfigError: unknown model or tag, invalid weights, an input size the model cannot take.
        DataError: timm not installed; weights absent from the caches, unreadable or not fitting.
    """
    timm = _import_timm(backbone)
    name = model_name(backbone)
    cfg = _pretrained_cfg(name)
    source = _weights_file(name, cfg, weights)
    with torch.random.fork_rng(devices=[]):  # reproducible random init, global RNG untouched
        torch.manual_seed(_INIT_SEED)
        net = _create(timm, name, cfg, image_size)
    if source is None:
        if warn_random:
            log.warning("%s with weights = none: random initialisation, the features are random", backbone)
        digest = ""
    else:
        load_weights(net, read_state_dict(source), drop=_classifier_prefixes(cfg), what=f"{source} for {backbone}")
        digest = sha256_file(source)
    provenance = {"backbone": backbone, "weights": weights, "weights_sha256": digest, "random_init": source is None}
    dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    return Backbone(net.eval(), feature_dim=dim, provenance=provenance)


def _create(timm: ModuleType, name: str, cfg: dict, image_size: int) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``, with ``dynamic_img_size`` for a fixed-size model at another size."""
    native = int((cfg.get("input_size") or (3, 224, 224))[-1])
    if not cfg.get("fixed_input_size") or image_size == native:
        return timm.create_model(name, pretrained=False, num_classes=0)
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # the model's constructor has no such option
        raise ConfigError(f"timm:{name} takes {native} x {native} inputs only: set extract.image_size = {native}, "
                          f"not {image_size}") from None
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    if patch and any(image_size % p for p in patch):
        raise ConfigError(f"extract.image_size = {image_size} is invalid for timm:{name}: expected a multiple of its "
                          f"patch size {patch[0]} (native {native})")
    return net


def _classifier_prefixes(cfg: dict) -> tuple[str, ...]:
    """State_dict key prefixes of the classifier (``head.``, ``head.fc.``, ``fc.``, ...), dropped when loading."""
    names = cfg.get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


# ------------------------------------------------------------------ weights

def _weights_file(name: str, cfg: dict, weights: str) -> Path | None:
    """The local file ``weights`` refers to; None for ``none``. Never downloads."""
    text = weights.strip()
    if text.lower() == "none":
        return None
    if text.upper() in _PRETRAINED_NAMES:
        return _cached_pretrained(name, cfg)
    folder = Path(text).expanduser()
    if folder.is_dir():  # e.g. huggingface-cli download timm/<name> --local-dir DIR
        for f in _HUB_FILES:
            if (folder / f).is_file():
                return folder / f
        raise DataError(f"weights folder {folder} holds no {' or '.join(_HUB_FILES)}")
    path = weights_path(text)
    if path is None:
        raise ConfigError(f"weights {weights!r} for timm:{name} are invalid: expected none, DEFAULT (the pretrained "
                          "weights, from the local cache) or the path of a state_dict file (.safetensors, .pth, .bin)")
    return path


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, from the environment as huggingface_hub resolves it (read now, not
    at import): ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``,
    ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _cached_pretrained(name: str, cfg: dict) -> Path:
    """The cached file of ``name``'s pretrained weights; a one-line ``DataError`` saying where to get it if absent."""
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hub_id:  # timm prefers the hub when a model has both
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        cache = hf_hub_cache()
        files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else _HUB_FILES
        for f in files:
            found = try_to_load_from_cache(repo, f, cache_dir=cache, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        raise DataError(f"the pretrained weights of timm:{name} are not in the Hugging Face cache {cache} "
                        f"(repo {repo}) and mcpipe does not download them: get {files[0]} from "
                        f"https://huggingface.co/{repo} and set extract.weights to its path, or to none")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if cached.is_file():
            return cached
        raise DataError(f"the pretrained weights of timm:{name} are not in the torch hub cache ({cached}) and mcpipe "
                        f"does not download them: get {url} and set extract.weights to its path, or to none")
    raise DataError(f"timm:{name} has no pretrained weights in timm; set extract.weights to a state_dict file "
                    "or to none")
