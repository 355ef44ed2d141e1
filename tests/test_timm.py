"""timm backbones ("timm:<model name>"): tiny random-init test models, weights files and the local caches with no
network, preprocessing from the model's data config, and extract -> finetune -> predict through the CLI."""

from __future__ import annotations

import csv
import json
import socket
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fixtures_data import make_noisy_colour_images
from mcpipe.cli import app
from mcpipe.config import load_config
from mcpipe.errors import ConfigError, DataError
from mcpipe.extract.backbones import Backbone, build_backbone, fold_batchnorm, optimize_for_inference, sha256_file
from mcpipe.extract.preprocess import preprocess_for
from mcpipe.finetune.export import load_model
from mcpipe.store.reader import open_store

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

runner = CliRunner()


def _x(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _classifier_net(name: str, seed: int = 1, **kwargs) -> nn.Module:
    """A timm classifier (10 classes) with other weights than mcpipe's seed-0 random init."""
    torch.manual_seed(seed)
    net = timm.create_model(name, num_classes=10, **kwargs).eval()
    for m in net.modules():  # non-trivial batch-norm statistics, as trained weights have
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net


def _pooled(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net.forward_head(net.forward_features(x), pre_logits=True)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_config_accepts_timm_names_and_still_refuses_unknown_ones():
    assert load_config(None, ["extract.backbone=timm:vit_small_patch14_dinov2.lvd142m"]).extract.backbone == \
        "timm:vit_small_patch14_dinov2.lvd142m"
    with pytest.raises(ConfigError, match=r"extract\.backbone = 'resnet5' is invalid: expected one of 'resnet18'.*"
                                          r"or 'timm:<model name>'"):
        load_config(None, ["extract.backbone=resnet5"])
    with pytest.raises(ConfigError, match=r"extract\.backbone = 'timm:' is invalid"):
        load_config(None, ["extract.backbone=timm:"])


@pytest.mark.parametrize("name", ["test_vit", "test_convnext", "test_efficientnet"])
def test_random_init_is_seeded_pooled_and_trainable(name):
    before = torch.random.get_rng_state()
    bb = build_backbone(f"timm:{name}", "none", image_size=64)
    assert torch.equal(torch.random.get_rng_state(), before), "the global RNG must be left alone"
    assert bb.feature_dim == timm.create_model(name, num_classes=0).num_features
    assert bb.provenance == {"backbone": f"timm:{name}", "weights": "none", "weights_sha256": "", "random_init": True}
    out = _features(bb, _x())
    assert out.shape == (2, bb.feature_dim) and out.dtype == torch.float32
    assert torch.equal(_features(build_backbone(f"timm:{name}", "NONE", image_size=64), _x()), out)
    assert all(p.requires_grad for p in bb.parameters()), "finetune trains the backbone"


@pytest.mark.parametrize("name", ["test_convnext", "test_vit"])  # classifier head.fc (head.norm kept) / head
def test_weights_files_round_trip(tmp_path, name):
    net = _classifier_net(name, dynamic_img_size=True) if name == "test_vit" else _classifier_net(name)
    sd = net.state_dict()
    classifier = ("head.fc." if name == "test_convnext" else "head.")
    without = {k: v for k, v in sd.items() if not k.startswith(classifier)}
    assert len(without) < len(sd)
    torch.save(sd, tmp_path / "with_head.pth")
    torch.save({"state_dict": without}, tmp_path / "without_head.pth")
    safetensors_torch.save_file(without, str(tmp_path / "w.safetensors"))
    (tmp_path / "hub_folder").mkdir()
    safetensors_torch.save_file(sd, str(tmp_path / "hub_folder" / "model.safetensors"))
    expected = _pooled(net, _x())
    for weights in ("with_head.pth", "without_head.pth", "w.safetensors", "hub_folder"):
        bb = build_backbone(f"timm:{name}", str(tmp_path / weights), image_size=64)
        assert torch.equal(_features(bb, _x()), expected), weights
        assert bb.provenance["random_init"] is False
    assert bb.provenance["weights_sha256"] == sha256_file(tmp_path / "hub_folder" / "model.safetensors")


def test_wrong_weights_are_refused_in_one_line(tmp_path):
    torch.save(_classifier_net("test_resnet").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(DataError, match="does not fit the network: missing keys stem") as info:
        build_backbone("timm:test_convnext", str(tmp_path / "resnet.pth"), image_size=64)
    _one_line(info)
    (tmp_path / "noise.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(DataError, match="is not a safetensors file") as info:
        build_backbone("timm:test_convnext", str(tmp_path / "noise.safetensors"), image_size=64)
    _one_line(info)
    with pytest.raises(DataError, match="does not exist"):
        build_backbone("timm:test_convnext", str(tmp_path / "absent.safetensors"), image_size=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no model.safetensors or pytorch_model.bin"):
        build_backbone("timm:test_convnext", str(tmp_path / "empty"), image_size=64)
    with pytest.raises(ConfigError, match="expected none, DEFAULT"):
        build_backbone("timm:test_convnext", "IMAGENET1K_V2", image_size=64)


def test_unknown_models_and_tags_are_config_errors():
    with pytest.raises(ConfigError, match="unknown timm model 'convnext_tinyy'.*did you mean convnext_tiny") as info:
        build_backbone("timm:convnext_tinyy", "none", image_size=64)
    _one_line(info)
    with pytest.raises(ConfigError, match="has no pretrained tag 'bogus'; its tags: c3_in1k"):
        preprocess_for("timm:resnet10t.bogus", 64)
    with pytest.raises(ConfigError, match="hub ids are not fetched"):
        build_backbone("timm:hf-hub:timm/test_vit.r160_in1k", "none", image_size=64)
    with pytest.raises(ConfigError, match="unknown backbone 'vgg16'.*or timm:<model name>"):
        build_backbone("vgg16", "none", image_size=64)


def test_a_fixed_size_model_that_cannot_resize_is_refused():
    with pytest.raises(ConfigError, match=r"timm:test_maxvit takes 160 x 160 inputs only: "
                                          r"set extract\.image_size = 160"):
        build_backbone("timm:test_maxvit", "none", image_size=64)
    with pytest.raises(ConfigError, match="expected a multiple of its patch size 16"):
        build_backbone("timm:test_vit", "none", image_size=72)


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches under tmp_path, and no network at all."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("mcpipe must not touch the network for timm weights")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return tmp_path


def test_default_weights_come_only_from_the_local_hub_cache(offline_caches):
    hub = offline_caches / "hf" / "hub"
    with pytest.raises(DataError) as info:
        build_backbone("timm:test_convnext", "DEFAULT", image_size=64)
    msg = _one_line(info)
    assert str(hub) in msg and "https://huggingface.co/timm/test_convnext.r160_in1k" in msg
    assert "model.safetensors" in msg and "extract.weights" in msg and "does not download" in msg
    # the layout huggingface_hub writes: refs/main names the snapshot holding the files
    repo = hub / "models--timm--test_convnext.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    net = _classifier_net("test_convnext")
    cached = repo / "snapshots" / commit / "model.safetensors"
    safetensors_torch.save_file(net.state_dict(), str(cached))
    bb = build_backbone("timm:test_convnext", "pretrained", image_size=64)
    assert bb.provenance["weights"] == "pretrained" and bb.provenance["weights_sha256"] == sha256_file(cached)
    assert torch.equal(_features(bb, _x()), _pooled(net, _x()))


def test_preprocessing_comes_from_the_model_data_config():
    clip = preprocess_for("timm:vit_base_patch16_clip_224.openai", 224)  # pretrained cfg only: nothing is built
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert clip.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert clip.interpolation == "bicubic" and clip.resize == round(224 / 0.9) and clip.image_size == 224
    dino = preprocess_for("timm:vit_small_patch14_dinov2.lvd142m", 224)  # crop_pct 1: no margin cropped
    assert dino.mean == pytest.approx((0.485, 0.456, 0.406)) and dino.resize == 224
    tiny = preprocess_for("timm:test_vit", 64, 80)
    assert tiny.mean == (0.5, 0.5, 0.5) and tiny.resize == 80
    assert preprocess_for("resnet18", 64).interpolation == "bilinear"  # the built-in backbones as before


def test_batchnorm_folding_keeps_timm_features():
    x = _x(4)
    net = _classifier_net("test_efficientnet")  # BatchNormAct2d: batch norm *and* activation, never folded
    net.reset_classifier(0)
    assert torch.allclose(_features(fold_batchnorm(net), x), _features(net, x), atol=1e-5)
    net = _classifier_net("test_resnet")  # plain BatchNorm2d: folded
    net.reset_classifier(0)
    bb = Backbone(net, feature_dim=net.num_features, provenance={"backbone": "timm:test_resnet"})
    fast = optimize_for_inference(bb, "cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert torch.allclose(_features(fast, x), _features(net, x), rtol=1e-4, atol=1e-5)
    vit = build_backbone("timm:test_vit", "none", image_size=64, warn_random=False)  # untraceable: used as it is
    assert torch.equal(_features(optimize_for_inference(vit, "cpu"), x), _features(vit, x))


def test_without_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import now fails
    with pytest.raises(DataError, match=r"backbone timm:test_vit needs the optional extra: "
                                        r"pip install 'mcpipe\[timm\]'"):
        build_backbone("timm:test_vit", "none", image_size=64)
    with pytest.raises(DataError, match=r"pip install 'mcpipe\[timm\]'"):
        preprocess_for("timm:test_vit", 64)


def test_extract_train_head_finetune_predict_through_the_cli(tmp_path):
    data = make_noisy_colour_images(tmp_path / "data", {"train": 8, "val": 4, "test": 3})
    keys = ["data.source=imagefolder", f"data.root={data}", "extract.backbone=timm:test_efficientnet",
            "extract.weights=none", "extract.image_size=32", "extract.device=cpu", "extract.num_workers=0",
            "extract.batch_size=8", "cleaner.subset_size=2", "cleaner.hidden=16"]
    sets = [a for k in keys for a in ("--set", k)]
    quiet = ("--no-progress", "--log-level", "warning")
    res = runner.invoke(app, ["extract", *quiet, "--out", str(tmp_path / "f"), *sets])
    assert res.exit_code == 0, res.output
    store = open_store(tmp_path / "f" / "train.h5")
    assert store.features.shape == (24, 256)
    assert store.attrs["backbone"] == "timm:test_efficientnet" and store.attrs["random_init"] is True
    res = runner.invoke(app, ["train-head", *quiet, "--features", str(tmp_path / "f"), "--out", str(tmp_path / "head"),
                              *sets, "--set", "train.epochs=2", "--set", "train.batch_size=12"])
    assert res.exit_code == 0, res.output
    ft = ["finetune.batch_size=12", "finetune.epochs=1", "finetune.workers=0", "finetune.device=cpu"]
    res = runner.invoke(app, ["finetune", *quiet, "--head", str(tmp_path / "head"), "--out", str(tmp_path / "run"),
                              *sets, *[a for k in ft for a in ("--set", k)]])
    assert res.exit_code == 0, res.output
    net, meta = load_model(tmp_path / "run")
    assert meta["backbone"] == "timm:test_efficientnet" and meta["preprocessing"]["interpolation"] == "bicubic"
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    if m["exported_epoch"] == 1:  # the fine-tuned epoch, not the head on the initial backbone (epoch 0)
        fresh = build_backbone("timm:test_efficientnet", "none", image_size=32, warn_random=False).state_dict()
        trained = net.backbone.state_dict()
        assert any(not torch.equal(trained[k], v) for k, v in fresh.items() if k.endswith("conv_stem.weight"))
        assert all(torch.equal(trained[k], v) for k, v in fresh.items() if "running_" in k), "batch norm stays frozen"
    res = runner.invoke(app, ["predict", "--no-progress", "--model", str(tmp_path / "run"), "--out",
                              str(tmp_path / "pred.csv"), "--device", "cpu", str(data / "test")])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and all(r["status"] == "ok" and r["predicted"] in meta["classes"] for r in rows)
