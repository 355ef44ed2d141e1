"""Preprocessing: one definition, recorded as JSON, exact normalisation."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from PIL import Image

from mcpipe.errors import ConfigError
from mcpipe.extract.backbones import BACKBONES
from mcpipe.extract.preprocess import (NORMALIZATION, Preprocess, eval_transform, preprocess_for,
                                       train_transform)


def test_defaults_for_resnet():
    p = preprocess_for("resnet50", 224)
    assert (p.image_size, p.resize, p.interpolation) == (224, 256, "bilinear")
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert preprocess_for("resnet18", 64).resize == 73  # round(64 / 0.875)
    assert preprocess_for("resnet18", 64, 100).resize == 100


def test_lite_normalisation_is_its_minus_127_over_128():
    p = preprocess_for("efficientnet_lite0", 224)
    x = torch.tensor([0.0, 127.0, 255.0]) / 255
    got = (x - p.mean[0]) / p.std[0]
    assert torch.allclose(got, (torch.tensor([0.0, 127.0, 255.0]) - 127) / 128)


def test_every_backbone_has_a_normalisation():
    assert all(spec.preprocess in NORMALIZATION for spec in BACKBONES.values())


def test_refused_values():
    with pytest.raises(ConfigError, match="resnet50"):
        preprocess_for("vgg16", 224)
    with pytest.raises(ConfigError, match="image_size <= resize"):
        preprocess_for("resnet50", 224, 200)
    with pytest.raises(ConfigError, match="interpolation"):
        Preprocess(image_size=8, resize=8, mean=(0, 0, 0), std=(1, 1, 1), interpolation="lanczos7")


def test_to_dict_is_json_and_round_trips():
    p = preprocess_for("efficientnet_lite0", 96)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["crop"] == "center" and d["resize"] == 110
    assert Preprocess.from_dict(d) == p


def test_eval_transform_on_a_constant_image():
    p = preprocess_for("resnet50", 32)
    rgb = (200, 100, 50)
    out = eval_transform(p)(Image.new("RGB", (90, 50), rgb))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    want = (torch.tensor(rgb) / 255 - torch.tensor(p.mean)) / torch.tensor(p.std)
    assert torch.allclose(out, want.view(3, 1, 1).expand(3, 32, 32), atol=1e-6)


def test_eval_transform_crops_the_center():
    p = Preprocess(image_size=4, resize=4, mean=(0, 0, 0), std=(1, 1, 1))
    img = Image.new("RGB", (12, 4), (0, 0, 0))
    img.paste((255, 255, 255), (4, 0, 8, 4))  # white middle third
    out = eval_transform(p)(img)
    assert torch.equal(out, torch.ones(3, 4, 4))


def test_eval_transform_is_deterministic_and_picklable():
    p = preprocess_for("resnet18", 24)
    t = pickle.loads(pickle.dumps(eval_transform(p)))  # DataLoader workers receive it pickled
    img = Image.effect_noise((40, 30), 50).convert("RGB")
    assert torch.equal(t(img), eval_transform(p)(img))


def test_train_transform():
    p = preprocess_for("resnet18", 24)
    img = Image.effect_noise((40, 30), 50).convert("RGB")
    torch.manual_seed(0)
    outs = [train_transform(p)(img) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) and o.dtype == torch.float32 for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # random crops
