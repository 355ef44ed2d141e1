"""Configuration: frozen dataclasses mirroring the tables of ``pipeline.toml``.

Precedence: CLI flags > ``--set section.key=value`` > the TOML file > defaults.
Unknown sections or keys are refused with the valid names listed; values are
type-checked against the field annotations, ranges in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mcpipe.errors import ConfigError

SourceName = Literal["imagefolder", "manifest", "food101n", "clothing1m", "fashion-mnist", "mnist", "cifar10",
                     "cifar100", "webdataset"]
BackboneName = Literal[
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2", "efficientnet_lite0",
]
TIMM_PREFIX = "timm:"  # extract.backbone = "timm:<model name>": any timm model (optional extra timm)


def _check(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {expected}")


def _check_device(key: str, dev: str) -> None:
    ok = dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
    _check(ok, key, dev, "auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class DataConfig:
    source: SourceName = "imagefolder"
    """Layout of the data set: imagefolder, manifest, food101n, clothing1m, fashion-mnist, mnist, cifar10, cifar100,
    webdataset (.tar shards, img2dataset's output)."""
    root: str = "data"
    """Folder that holds the data set, in the layout `source` names."""
    test_root: str = ""
    """Root of a separate test set (Food-101 for food101n); empty = <root>/../food-101."""
    splits: tuple[str, ...] = ()
    """Splits to extract, e.g. ["train", "test"]; empty = every split the source has."""
    limit: int = 0
    """Images per split, 0 = all; a quick run takes a seeded subset."""
    subset: Literal["random", "first"] = "random"
    """How `limit` picks images: a seeded random subset or the first ones."""
    seed: int = 0
    """Seed of the random subset."""
    noisy_labels: str = ""
    """A file of human label sets for the training split, e.g. CIFAR-10_human.pt (CIFAR-10N) or
    CIFAR-100_human.pt (CIFAR-100N), relative to root unless absolute; its clean_label become the clean labels."""
    label_set: str = ""
    """With noisy_labels: aggre, worst, random1, random2, random3 (CIFAR-10N) or noisy (CIFAR-100N)."""

    def __post_init__(self) -> None:
        _check(self.limit >= 0, "data.limit", self.limit, "an integer >= 0 (0 = all)")
        _check(bool(self.noisy_labels) == bool(self.label_set), "data.label_set", self.label_set,
               "a label set name exactly when data.noisy_labels names a file (e.g. aggre for CIFAR-10_human.pt)")


@dataclass(frozen=True)
class ExtractConfig:
    backbone: str = "resnet50"
    """Feature network: a BackboneName (torchvision ResNets, resnet50: 2048-d; efficientnet_lite0, 1280-d) or
    timm:<model name> (pip extra timm), e.g. timm:vit_small_patch14_dinov2.lvd142m."""
    weights: str = "DEFAULT"
    """DEFAULT (the network's ImageNet weights; for timm the tag's, from the local cache only), a torchvision weights name such as IMAGENET1K_V2, a local state_dict path, or none (random init)."""
    image_size: int = 224
    """Side of the center crop fed to the network, in pixels."""
    resize: int = 0
    """Shorter side after resizing, before the crop; 0 = image_size / 0.875 (256 for 224)."""
    batch_size: int = 64
    """Images per forward pass; also the block size the store is written and resumed in."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    num_workers: int = -1
    """DataLoader worker processes decoding images; -1 = auto."""
    strict: bool = False
    """Stop at the first unreadable image instead of skipping and recording it."""

    def __post_init__(self) -> None:
        names = typing.get_args(BackboneName)
        timm_name = self.backbone.startswith(TIMM_PREFIX) and len(self.backbone) > len(TIMM_PREFIX)
        _check(self.backbone in names or timm_name, "extract.backbone", self.backbone,
               "one of " + ", ".join(repr(n) for n in names) + f", or '{TIMM_PREFIX}<model name>'")
        _check(16 <= self.image_size <= 1024, "extract.image_size", self.image_size, "an integer in [16, 1024]")
        _check(self.resize == 0 or self.resize >= self.image_size, "extract.resize", self.resize,
               f"0 (auto) or an integer >= image_size ({self.image_size})")
        _check(self.batch_size >= 1, "extract.batch_size", self.batch_size, "an integer >= 1")
        _check(self.num_workers >= -1, "extract.num_workers", self.num_workers, "-1 (auto) or an integer >= 0")
        _check_device("extract.device", self.device)
        _check(bool(self.weights.strip()), "extract.weights", self.weights,
               "DEFAULT, a torchvision weights name, a file path or none")


@dataclass(frozen=True)
class StoreConfig:
    dir: str = "features"
    """Folder of the feature stores: one HDF5 file per split, <dir>/<split>.h5."""
    dtype: Literal["float16", "float32"] = "float16"
    """Feature precision on disk."""
    chunk_rows: int = 256
    """Rows per HDF5 chunk: a contiguous block or a class's rows are read in few chunks."""
    sync_seconds: float = 5.0
    """Longest time between fsyncs of the store while writing (what a power loss can cost)."""

    def __post_init__(self) -> None:
        _check(self.chunk_rows >= 1, "store.chunk_rows", self.chunk_rows, "an integer >= 1")
        _check(self.sync_seconds >= 0, "store.sync_seconds", self.sync_seconds, "a number >= 0")


# The choices of the stages' building blocks, defined once here (the modules take theirs from these).
Weighting = Literal["constant", "attention_sig", "attention_exp", "fc_fc_sig", "fc_fc_relu_sig",
                    "fc_relu_fc_relu_sig", "relation"]
Combine = Literal["hallucinate", "loss_reweight"]
Mining = Literal["random", "knn", "agreement"]
NoiseKind = Literal["none", "symmetric", "pairflip", "matrix", "instance"]


@dataclass(frozen=True)
class NoiseConfig:
    kind: NoiseKind = "none"
    """Synthetic label noise added in memory for experiments (the store is untouched); instance = flips drawn mostly
    among the images that look most like another class, to that class (needs features: train-head only)."""
    rate: float = 0.0
    """Fraction of training labels flipped (symmetric, pairflip, instance)."""
    seed: int = 0
    """Seed of the flips."""
    matrix: tuple[tuple[float, ...], ...] = ()
    """kind = matrix: a C x C row-stochastic transition matrix, row = true class, column = given label."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.rate < 1.0, "noise.rate", self.rate, "a number in [0, 1)")
        if self.kind == "matrix":
            _check(len(self.matrix) > 1, "noise.matrix", self.matrix, "a C x C row-stochastic matrix when kind = matrix")


@dataclass(frozen=True)
class LabelsConfig:
    file: str = ""
    """A label file (CSV/TSV: id, label, optionally clean_label) whose labels replace the training split's given
    ones, e.g. the output of mcpipe clean; empty = the store's (or the data set's) labels. The store is never
    rewritten; the run records the file's sha256."""


@dataclass(frozen=True)
class CleanerConfig:
    subset_size: int = 4
    """N, images per class subset; 1 = the plain softmax baseline."""
    weighting: Weighting = "relation"
    """Noisy Weighting: relation (permutation-equivariant, ours: each image scored against the rest of its subset)
    or the paper's six variants (Table 2)."""
    combine: Combine = "hallucinate"
    """How alpha is used: v_c = sum(alpha v) / sum(alpha), or alpha weighting each image's loss (Table 3)."""
    hidden: int = 384
    """Hidden width of the weighting network (paper: 384 Food-101N, 512 Clothing1M)."""
    mining: Mining = "random"
    """How subsets are drawn: at random (paper), anchor + same-label neighbours, or by neighbourhood agreement."""
    knn_k: int = 10
    """Neighbours per image in the FAISS graph (agreement score, knn mining)."""
    knn_score: bool = True
    """Write each image's neighbourhood label agreement (``knn_score``) in scores.csv. The FAISS graph is built
    (once, cached beside the store) only when this, ``mining`` other than random or ``train.rank_by = "knn"``
    needs it."""
    score_repeats: int = 8
    """Random subsets each training image is scored in for alpha_score."""

    def __post_init__(self) -> None:
        _check(self.subset_size >= 1, "cleaner.subset_size", self.subset_size, "an integer >= 1")
        _check(self.hidden >= 1, "cleaner.hidden", self.hidden, "an integer >= 1")
        _check(self.knn_k >= 1, "cleaner.knn_k", self.knn_k, "an integer >= 1")
        _check(self.score_repeats >= 1, "cleaner.score_repeats", self.score_repeats, "an integer >= 1")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 80
    """Training epochs; one epoch draws as many images as the training set holds."""
    batch_size: int = 480
    """Images per batch = K classes x N images (paper: 480 Food-101N, 256 Clothing1M)."""
    lr: float = 0.01
    """SGD learning rate."""
    lr_step: int = 20
    """Epochs between learning-rate drops (paper: 20 Food-101N, 5 Clothing1M)."""
    lr_gamma: float = 0.1
    """Factor of each drop."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.001
    """L2 weight decay (paper: 0.001 Food-101N, 0.005 Clothing1M)."""
    standardize: bool = True
    """Standardize features with the training set's mean and std (kept in the head)."""
    rank_by: Literal["alpha", "classifier", "knn"] = "classifier"
    """Clean score that ranks scores.csv and gives noise_detection_auroc."""
    seed: int = 0
    """Seed of initialisation and sampling: the same config gives the same numbers."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    val_fraction: float = 0.1
    """Training rows held out (seeded, stratified by given label) to choose on, when the store folder has no
    val.h5; 0 = none (then nothing can be chosen: auto needs validation)."""
    auto: bool = True
    """Choose N, weight decay, epochs and a second round on the validation split; false = train this config."""
    search_sizes: tuple[int, ...] = ()
    """auto: subset sizes N tried; empty = 1 and cleaner.subset_size."""
    search_weight_decays: tuple[float, ...] = (0.001, 0.01, 0.1, 0.3, 1.0, 3.0)
    """auto: weight decays tried for the softmax heads (N = 1, both rounds, trained together in one pass)."""
    second_round: bool = True
    """auto: also try dropping / relabelling the training images that cross-validated probabilities flag
    (confident learning's per-class thresholds), then training again."""
    cv_folds: int = 5
    """auto: folds of the cross-validated probabilities the second round flags images with."""
    refit: bool = True
    """auto: retrain the chosen configuration on all training rows (validation rows included) for its chosen
    number of epochs; false = keep the model as trained during the search."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _check(0 <= self.val_fraction < 0.9, "train.val_fraction", self.val_fraction, "a number in [0, 0.9)")
        _check(all(n >= 1 for n in self.search_sizes), "train.search_sizes", self.search_sizes,
               "a list of integers >= 1")
        _check(len(self.search_weight_decays) >= 1 and all(w >= 0 for w in self.search_weight_decays),
               "train.search_weight_decays", self.search_weight_decays, "a non-empty list of numbers >= 0")
        _check(self.cv_folds >= 2, "train.cv_folds", self.cv_folds, "an integer >= 2")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _check(self.lr_step >= 1, "train.lr_step", self.lr_step, "an integer >= 1")
        _check(0 < self.lr_gamma <= 1, "train.lr_gamma", self.lr_gamma, "a number in (0, 1]")
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _check_device("train.device", self.device)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 10
    """Phase 1: epochs of end-to-end training with the cleaner in the loop (0 = skip)."""
    batch_size: int = 64
    """Images per batch and process = K classes x N images (N = cleaner.subset_size)."""
    lr: float = 0.01
    """SGD learning rate of the cleaner and classifier."""
    backbone_lr: float = 0.001
    """SGD learning rate of the backbone."""
    lr_schedule: Literal["cosine", "step"] = "cosine"
    """Per phase, stepped every batch: cosine = half a cosine from lr down to 0 at the phase's end; step = lr
    divided by 1 / lr_gamma every lr_step epochs. Both after warmup_epochs of linear warm-up."""
    warmup_epochs: float = 0.0
    """Epochs (fractions allowed) of linear warm-up at the start of each phase."""
    lr_step: int = 5
    """lr_schedule = step: epochs between learning-rate drops, counted inside each phase."""
    lr_gamma: float = 0.1
    """Factor of each drop."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0001
    """L2 weight decay."""
    freeze_epochs: int = 0
    """First epochs of phase 1 with the backbone frozen (only cleaner and classifier learn)."""
    unload_epochs: int = 0
    """Phase 2: epochs of plain softmax training after dropping the cleaner (paper, CIFAR-10/ImageNet)."""
    clean_split: str = ""
    """Phase 3: a split with clean labels to fine-tune on (e.g. verified_train, clean_train); empty = none."""
    clean_epochs: int = 0
    """Phase 3: epochs of plain softmax training on clean_split (paper, Clothing1M)."""
    train_split: str = "train"
    """Split trained on (its labels get [noise])."""
    test_split: str = "test"
    """Split evaluated after every epoch, cleaner removed, only reported: nothing is chosen on it; empty or absent =
    no evaluation."""
    val_split: str = "val"
    """Validation split, evaluated after every epoch to choose the best epoch on; when the data has no such split
    (or it is empty), val_fraction of train_split is held out instead."""
    val_fraction: float = 0.1
    """Without val_split: share of train_split's images (stratified by given label, seeded by seed) held out of
    training for validation, with their given labels; 0 = no validation."""
    crop_scale: float = 0.08
    """Smallest share of an image's area the random resized crop keeps (ImageNet training: 0.08; 1 = only
    resize, flip and aspect jitter)."""
    export: Literal["best", "last"] = "best"
    """Which weights model.pt gets: best = those of the epoch with the highest validation top-1 (with --head,
    epoch 0, the head on the pretrained backbone, counts too); last = the last epoch's. Without a validation
    set: last."""
    workers: int = 2
    """DataLoader processes decoding images (0 = in the training process)."""
    checkpoint_minutes: float = 10.0
    """Minutes between checkpoints inside an epoch (checkpoint.pt, holding the position in the epoch, so --resume
    continues from there), besides the one at each epoch's end; 0 = only at epochs' ends."""
    freeze_bn: bool = True
    """Keep the backbone's batch-norm statistics fixed (those the head's features were extracted with); false =
    update them from every batch."""
    amp: Literal["auto", "bf16", "none"] = "auto"
    """Mixed precision: auto = bf16 autocast on CUDA, float32 on CPU."""
    seed: int = 0
    """Seed of initialisation, sampling and augmentation: a resumed run repeats an uninterrupted one."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (under torchrun each process takes its LOCAL_RANK GPU)."""

    def __post_init__(self) -> None:
        for key in ("epochs", "freeze_epochs", "unload_epochs", "clean_epochs", "workers"):
            _check(getattr(self, key) >= 0, f"finetune.{key}", getattr(self, key), "an integer >= 0")
        _check(self.batch_size >= 1, "finetune.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, "finetune.lr", self.lr, "a number > 0")
        _check(self.backbone_lr >= 0, "finetune.backbone_lr", self.backbone_lr, "a number >= 0")
        _check(self.warmup_epochs >= 0, "finetune.warmup_epochs", self.warmup_epochs, "a number >= 0")
        _check(self.lr_step >= 1, "finetune.lr_step", self.lr_step, "an integer >= 1")
        _check(0 < self.lr_gamma <= 1, "finetune.lr_gamma", self.lr_gamma, "a number in (0, 1]")
        _check(0 <= self.momentum < 1, "finetune.momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, "finetune.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.freeze_epochs <= self.epochs, "finetune.freeze_epochs", self.freeze_epochs,
               f"at most finetune.epochs = {self.epochs}")
        _check(self.epochs + self.unload_epochs + self.clean_epochs >= 1, "finetune.epochs", self.epochs,
               "at least one epoch in some phase (epochs, unload_epochs or clean_epochs)")
        _check(bool(self.clean_split) == (self.clean_epochs > 0), "finetune.clean_split", self.clean_split,
               "a split name exactly when finetune.clean_epochs > 0")
        _check(0 < self.crop_scale <= 1, "finetune.crop_scale", self.crop_scale, "a number in (0, 1]")
        _check(0 <= self.val_fraction < 1, "finetune.val_fraction", self.val_fraction, "a number in [0, 1)")
        _check(self.checkpoint_minutes >= 0, "finetune.checkpoint_minutes", self.checkpoint_minutes,
               "a number >= 0 (0 = a checkpoint at each epoch's end only)")
        for key in ("train_split", "test_split", "clean_split"):
            _check(not self.val_split or self.val_split != getattr(self, key), "finetune.val_split", self.val_split,
                   f"a split other than finetune.{key} (validation must be neither trained on nor the test split); "
                   f"\"\" = hold out finetune.val_fraction of finetune.train_split")
        _check_device("finetune.device", self.device)


@dataclass(frozen=True)
class SweepConfig:
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    """(section.key, values) pairs; mcpipe sweep runs every combination."""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    cleaner: CleanerConfig = field(default_factory=CleanerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        # a label file (mcpipe clean's above all) already holds the labels to train with, noise included
        _check(not self.labels.file or self.noise.kind == "none", "noise.kind", self.noise.kind,
               f"none when labels.file is set ({self.labels.file}): the file's labels are trained as they are")


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the field's type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} = {value!r} is invalid: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(key, v, item_tp) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            where = f"[{prefix}]" if prefix else "the config"
            raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{key} in {where}; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(f"{prefix}.{key}", value, hints[key])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> (section, key, value); value parsed as TOML, else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r} is invalid: expected section.key=value, e.g. data.limit=1000")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words: --set data.source=mnist
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < TOML file at ``path`` (if given) < ``overrides`` ("section.key=value")."""
    tables: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (pass --config PATH)")
        try:
            tables = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    tables = {k: dict(v) if isinstance(v, dict) else v for k, v in tables.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        tables.setdefault(section, {})
        if not isinstance(tables[section], dict):
            raise ConfigError(f"[{section}] in the config is not a table")
        tables[section][key] = value
    return config_from_dict(tables)


def _sweep_grid(table: dict[str, Any]) -> SweepConfig:
    """``[sweep]``: ``cleaner.subset_size = [1, 2, 4]`` (a nested table) or ``"cleaner.subset_size" = [...]``."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    grid = []
    for dotted, values in flat.items():
        if "." not in dotted:
            raise ConfigError(f"sweep.{dotted} is invalid: expected section.key = [values], "
                              "e.g. cleaner.subset_size = [1, 2, 4]")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{dotted} = {values!r} is invalid: expected a non-empty list of values")
        section, key = dotted.split(".", 1)
        if section == "sweep":
            raise ConfigError("[sweep] cannot sweep over itself")
        for v in values:  # each value must be valid on its own
            config_from_dict({section: {key: v}})
        grid.append((dotted, tuple(values)))
    return SweepConfig(grid=tuple(grid))


def config_from_dict(tables: dict[str, Any]) -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, values in tables.items():
        if name == "sweep" and isinstance(values, dict):
            built[name] = _sweep_grid(values)
            continue
        if name not in sections:
            raise ConfigError(f"unknown section [{name}] in the config; valid sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] in the config must be a table of keys, got {values!r}")
        built[name] = _build(hints[name], values, name)
    return Config(**built)


def with_overrides(cfg: Config, changes: dict[str, Any]) -> Config:
    """``cfg`` with ``{"section.key": value}`` applied (a sweep point)."""
    by_section: dict[str, dict[str, Any]] = {}
    for dotted, value in changes.items():
        section, key = dotted.split(".", 1)
        by_section.setdefault(section, {})[key] = value
    for section, values in by_section.items():
        cfg = replace(cfg, section, **values)
    return cfg


def replace(cfg: Config, section: str, **changes: Any) -> Config:
    """A copy of ``cfg`` with keys of one section changed (CLI flags use this)."""
    sub = getattr(cfg, section)
    values = {**dataclasses.asdict(sub), **changes}
    return dataclasses.replace(cfg, **{section: _build(type(sub), values, section)})


# --------------------------------------------------------------------------- saving


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config, sections: tuple[str, ...] | None = None) -> str:
    """The resolved config as TOML text (the ``config.toml`` saved beside outputs)."""
    lines = []
    for f in dataclasses.fields(cfg):
        if sections is not None and f.name not in sections:
            continue
        lines.append(f"[{f.name}]")
        if f.name == "sweep":
            lines += [f'"{key}" = {_toml_value(list(values))}' for key, values in cfg.sweep.grid]
        else:
            for key, value in dataclasses.asdict(getattr(cfg, f.name)).items():
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
