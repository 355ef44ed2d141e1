"""Image preprocessing, defined once: extract's eval transform is the one finetune evaluates with.

If the two ever differed, features cached by extract would silently stop
matching what the fine-tuned network sees. ``Preprocess.to_dict()`` is
recorded in every store, so a reader can check it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from mcpipe.errors import ConfigError
from mcpipe.extract.backbones import backbone_spec, is_timm

# mean, std on 0-1 pixels, by a backbone's preprocessing kind (BackboneSpec.preprocess)
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # EfficientNet-Lite was trained on (x - 127) / 128 for 0-255 pixels x
    "lite": ((127 / 255,) * 3, (128 / 255,) * 3),
}

CROP_FRACTION = 0.875  # the usual ImageNet eval: resize to 256, center-crop 224

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a network input; eval: resize, center crop, normalise."""

    image_size: int
    """Side of the square center crop fed to the network."""
    resize: int
    """Shorter side after resizing, before the crop (>= image_size)."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted, on 0-1 pixels."""
    std: tuple[float, float, float]
    """Per-channel divisor, on 0-1 pixels."""
    interpolation: str = "bilinear"
    """Resampling filter: nearest, bilinear or bicubic (antialiased when shrinking)."""

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.resize < self.image_size:
            raise ConfigError(f"preprocessing resize = {self.resize}, image_size = {self.image_size} is invalid: "
                              "expected 1 <= image_size <= resize")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"preprocessing mean = {self.mean}, std = {self.std} is invalid: "
                              "expected three values each, std > 0")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"preprocessing interpolation = {self.interpolation!r} is invalid: "
                              f"expected one of {', '.join(INTERPOLATIONS)}")

    def to_dict(self) -> dict:
        """JSON-able description, as recorded in a store's ``preprocessing`` attribute."""
        return {"image_size": self.image_size, "resize": self.resize, "crop": "center",
                "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std],
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """The inverse of :meth:`to_dict` (e.g. finetune reading a store's attributes)."""
        return cls(image_size=int(d["image_size"]), resize=int(d["resize"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), interpolation=str(d.get("interpolation", "bilinear")))


def preprocess_for(backbone: str, image_size: int, resize: int = 0) -> Preprocess:
    """The eval preprocessing of ``backbone`` at ``image_size``; ``resize`` 0 = image_size / 0.875.

    A timm backbone ("timm:<model name>") takes mean, std, interpolation and the crop fraction
    (``resize`` 0 = image_size / crop_pct) from its own pretrained config; ``image_size`` stays the caller's
    (the model's native size is ``timm_backbone.data_config(backbone).input_size``).
    """
    if is_timm(backbone):
        from mcpipe.extract.timm_backbone import data_config

        d = data_config(backbone)
        mean, std, crop = d.mean, d.std, d.crop_pct
        interpolation = d.interpolation if d.interpolation in INTERPOLATIONS else "bicubic"
    else:
        (mean, std), crop = NORMALIZATION[backbone_spec(backbone).preprocess], CROP_FRACTION
        interpolation = "bilinear"
    if resize == 0:
        resize = max(image_size, round(image_size / crop))
    return Preprocess(image_size=image_size, resize=resize, mean=mean, std=std, interpolation=interpolation)


def eval_transform(p: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> (3, S, S) float32: resize the shorter side, center crop, normalise.

    Resizing runs on the uint8 tensor (antialiased), not in PIL: on one core,
    for a 512 x 384 image 1.3 ms against 2.6 ms through PIL (1024 x 768:
    3.8 against 5.3 ms). PIL only wins above ~2000 px, which JPEG draft
    decoding (``open_image(min_size=resize)``) avoids.
    """
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(p.resize, interpolation=InterpolationMode(p.interpolation), antialias=True),
        v2.CenterCrop(p.image_size),
        *_normalize(p),
    ])


def train_transform(p: Preprocess, *, crop_scale: float = 0.08) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> (3, S, S) float32: random resized crop (at least ``crop_scale`` of the area),
    horizontal flip, normalise."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(p.image_size, scale=(crop_scale, 1.0), interpolation=InterpolationMode(p.interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
        *_normalize(p),
    ])


def _normalize(p: Preprocess) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(p.mean), std=list(p.std))]
