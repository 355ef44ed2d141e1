"""Config loading: defaults, TOML, --set overrides, refusals, the shipped pipeline.toml."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from mcpipe.config import Config, config_from_dict, load_config, parse_override, replace, to_toml
from mcpipe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.extract.backbone == "resnet50" and cfg.store.dtype == "float16"


def test_toml_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[data]\nsource = "mnist"\nlimit = 10\n[extract]\nimage_size = 64\n')
    cfg = load_config(p, ["data.limit=20", "extract.backbone=resnet18", 'data.splits=["train", "test"]'])
    assert cfg.data.source == "mnist"
    assert cfg.data.limit == 20  # --set beats the file
    assert cfg.extract.image_size == 64
    assert cfg.extract.backbone == "resnet18"  # bare word parsed as a string
    assert cfg.data.splits == ("train", "test")


def test_cli_flag_beats_set():
    cfg = load_config(None, ["extract.device=cpu"])
    assert replace(cfg, "extract", device="cuda:1").extract.device == "cuda:1"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.nope=1", r"unknown key data\.nope.*valid keys: source, root"),
        ("nosection.key=1", r"unknown section \[nosection\].*valid sections: data, extract, store"),
        ("data.limit=-1", r"data\.limit = -1 is invalid"),
        ("data.limit=1.5", r"data\.limit = 1\.5 is invalid: expected an integer"),
        ("data.source=imagenet", r"data\.source = 'imagenet' is invalid: expected one of 'imagefolder'"),
        ("extract.image_size=8", r"extract\.image_size = 8 is invalid"),
        ("extract.batch_size=0", r"extract\.batch_size = 0 is invalid"),
        ("extract.device=tpu", r"extract\.device = 'tpu' is invalid"),
        ("extract.strict=yes", r"extract\.strict = 'yes' is invalid: expected true or false"),
        ("store.dtype=float64", r"store\.dtype = 'float64' is invalid"),
        ("limit=3", r"expected section\.key=value"),
    ],
)
def test_refused_overrides(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_refused_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nsource=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    notable = tmp_path / "notable.toml"
    notable.write_text("data = 3\n")
    with pytest.raises(ConfigError, match=r"\[data\] in the config must be a table"):
        load_config(notable)


def test_round_trip_through_saved_toml():
    cfg = load_config(None, ["data.limit=7", 'data.splits=["test"]', "store.sync_seconds=0", "data.root=a\"b"])
    again = config_from_dict(tomllib.loads(to_toml(cfg)))
    assert again == cfg


def test_pipeline_toml_is_the_defaults_and_every_key_is_commented():
    path = ROOT / "pipeline.toml"
    assert load_config(path) == Config()
    text = path.read_text()
    for section in dataclasses.fields(Config):
        if section.name == "sweep":  # free-form grid, documented by commented examples
            assert "[sweep]" in text
            continue
        for f in dataclasses.fields(getattr(Config(), section.name)):
            # the key's line must be preceded by a comment line
            m = re.search(rf"^((?:#.*\n)+){f.name} = ", text.split(f"[{section.name}]", 1)[1], re.M)
            assert m, f"{section.name}.{f.name} missing from pipeline.toml or not commented"


def test_sweep_grid():
    cfg = load_config(None, ["sweep.cleaner.subset_size=[1, 2]", 'sweep.noise.rate=[0.2, 0.4]'])
    assert cfg.sweep.grid == (("cleaner.subset_size", (1, 2)), ("noise.rate", (0.2, 0.4)))
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"cleaner\.subset_size = 0 is invalid"):
        load_config(None, ["sweep.cleaner.subset_size=[1, 0]"])
    with pytest.raises(ConfigError, match="non-empty list"):
        load_config(None, ["sweep.cleaner.subset_size=4"])
    with pytest.raises(ConfigError, match="unknown key cleaner.nope"):
        load_config(None, ["sweep.cleaner.nope=[1]"])


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a", "b", 3)
    assert parse_override("a.b=0.5") == ("a", "b", 0.5)
    assert parse_override("a.b=true") == ("a", "b", True)
    assert parse_override("a.b=some/path") == ("a", "b", "some/path")
