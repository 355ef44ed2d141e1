"""Find the images behind a store's ids, for the report's contact sheet.

A store records where its images came from (``data_root``, the extraction
config, the split). File sources keep ids relative to ``data_root``, so an
image is opened directly; array sources (Fashion-MNIST, CIFAR-10) and shard
sources (WebDataset, ids are sample keys) rebuild the split's index once. An
imported store (``mcpipe import``) records each row's image file as an
absolute path (its optional ``paths`` dataset) and those files are opened. When
the images cannot be reached, the reason is returned instead, so the report can
say so.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import numpy as np

from mcpipe.config import config_from_dict
from mcpipe.errors import MCPipeError
from mcpipe.extract.images import ImageSkip, open_image
from mcpipe.extract.sources.registry import load_index
from mcpipe.store.reader import FeatureStore, open_store, read_paths

THUMB = 160  # longest side of a contact-sheet tile, pixels


def _thumb(img) -> np.ndarray:  # noqa: ANN001 - PIL image
    img = img.convert("RGB")
    img.thumbnail((THUMB, THUMB))
    return np.asarray(img)


def load_images(store_path: Path, ids: list[str]) -> tuple[list[np.ndarray | None], str | None]:
    """Thumbnails (H, W, 3) uint8 of ``ids`` (None for one that cannot be read), or ([], why not)."""
    if not store_path.is_file():
        return [], f"the feature store {store_path} is not there (pass --features to say where it is)"
    try:
        store = open_store(store_path, load_features=False, allow_incomplete=True)
    except MCPipeError as exc:
        return [], f"the feature store cannot be opened: {exc}"
    attrs = store.attrs
    try:
        paths = read_paths(store)
    except MCPipeError as exc:
        return [], f"the feature store's image paths cannot be read: {exc}"
    if paths is not None:
        return _from_paths(store, paths, ids)
    if attrs.get("backbone") == "imported":
        return [], ("the imported store records no image paths (give mcpipe import a labels file with a path "
                    "column to show them)")
    root = Path(str(attrs.get("data_root") or ""))
    if str(root) and all((root / i).is_file() for i in ids[:3]):
        return [_open(root / i) for i in ids], None
    try:
        data = tomllib.loads(str(attrs.get("config_toml") or "")).get("data", {})
        cfg = dataclasses.replace(config_from_dict({"data": data}).data, limit=0)
        index = load_index(cfg, str(attrs.get("split")))
    except (MCPipeError, OSError, tomllib.TOMLDecodeError) as exc:
        return [], f"the images under {root or 'the store’s data root'} cannot be read: {exc}"
    where = {name: k for k, name in enumerate(index.ids)}
    out = []
    for i in ids:
        try:
            out.append(_thumb(index.load(where[i])) if i in where else None)
        except ImageSkip:
            out.append(None)
    if all(o is None for o in out):
        return [], f"none of the suspect images was found in {cfg.source} data under {cfg.root}"
    return out, None


def _from_paths(store: FeatureStore, paths: list[str], ids: list[str]) -> tuple[list[np.ndarray | None], str | None]:
    """Thumbnails of ``ids`` from the image paths the store records ("" = none known)."""
    where = dict(zip(store.ids, paths))
    files = [where.get(i, "") for i in ids]
    out = [_open(Path(f)) if f else None for f in files]
    if all(o is None for o in out):
        named = [f for f in files if f]
        if not named:
            return [], "the feature store records no image path for the suspect images"
        return [], f"none of the suspect images was found at the paths the store records (e.g. {named[0]})"
    return out, None


def _open(path: Path) -> np.ndarray | None:
    try:
        return _thumb(open_image(path))
    except ImageSkip:
        return None
