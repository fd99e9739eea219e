"""Frozen dataclass configuration and the named presets.

Every number of the model lives here, grouped by the paper concept it belongs to.
Conventions on which the paper/Detectron2 and torchvision differ are fields, not
code paths hidden in the maths (see SPEC §6): one model class runs either.

Class index convention (everywhere inside the library): label 0 is background,
labels 1..K are the foreground classes, so predictors have K + 1 outputs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

RESNET_DEPTHS = (18, 34, 50, 101, 152)
CHANNEL_ORDERS = ("RGB", "BGR")
SIZE_ROUNDINGS = ("floor", "round")
NORMS = ("FrozenBN", "BN", "GN")
LOSS_NORMS = ("torchvision", "detectron2")
ANCHOR_STRIDES = ("ratio", "nominal")
MASK_TARGETS = ("roi_align_soft", "binary")
PASTE_MODES = ("torchvision", "detectron2")
HEAD_INITS = ("torchvision", "detectron2")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine")


class ConfigError(ValueError):
    """A user-facing configuration mistake (unknown key, wrong type, value out of range)."""


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _numbers(config: Any, section: str, names: tuple[str, ...], ok, expected: str,
             kind: str = "number") -> None:
    """Refuse any named number (or entry of a tuple field) for which ``ok`` is false, saying
    it ``expects a {kind} {expected}``; NaN fails every comparison, so it is refused too."""
    for name in names:
        value = getattr(config, name)
        if not all(ok(v) for v in (value if isinstance(value, tuple) else (value,))):
            what = f"{kind}s" if isinstance(value, tuple) else f"a {kind}"
            raise ConfigError(f"{_key(section, name)}: expects {what} {expected}, got {value!r}")


def _at_least(config: Any, section: str, minimum: int, *names: str) -> None:
    """Refuse any named integer field (or entry of a tuple field) below ``minimum``."""
    _numbers(config, section, names, lambda v: v >= minimum, f">= {minimum}", kind="whole number")


def _between(config: Any, section: str, low: float, high: float, *names: str) -> None:
    """Refuse any named number outside [low, high] (``high`` may be ``math.inf``)."""
    expected = f">= {low}" if high == math.inf else f"from {low} to {high}"
    _numbers(config, section, names, lambda v: low <= v <= high, expected)


def _positive(config: Any, section: str, *names: str) -> None:
    """Refuse any named number that is not above 0."""
    _numbers(config, section, names, lambda v: v > 0, "> 0")


def _not_empty(config: Any, section: str, *names: str) -> None:
    """Refuse an empty tuple in any named field."""
    for name in names:
        if not getattr(config, name):
            raise ConfigError(f"{_key(section, name)}: expects at least one value, got none")


def _one_of(config: Any, section: str, name: str, allowed: tuple) -> None:
    """Refuse a value of field ``name`` that is not in ``allowed`` (compared exactly)."""
    value = getattr(config, name)
    if value not in allowed:
        raise ConfigError(f"{_key(section, name)}: unknown {name} {value!r}; "
                          f"expects one of {', '.join(map(str, allowed))}")


def check_device(device) -> None:
    """Refuse a device that is neither "auto" nor one torch names (cpu, cuda, cuda:N, mps, ...)."""
    import torch

    if device == "auto" or isinstance(device, torch.device):
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: unknown device {device!r}; expects one of auto, cpu, cuda, cuda:N") from None


@dataclass(frozen=True)
class InputConfig:
    """Pixel convention and resizing, applied inside the model.

    ``pixel_mean``/``pixel_std`` are in the scale given by ``pixel_scale``
    (1.0: pixels in [0, 1]; 255.0: pixels in [0, 255]). ``channel_order`` is the order
    the backbone expects; callers always pass RGB.
    """

    channel_order: str = "RGB"  # "RGB" or "BGR"
    pixel_scale: float = 1.0
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    min_size_train: tuple[int, ...] = (800,)
    min_size_test: int = 800
    max_size: int = 1333
    size_divisibility: int = 32
    # "round": int(x + 0.5) and PIL's filters, as Detectron2; "floor": torchvision's interpolate.
    size_rounding: str = "floor"

    def __post_init__(self) -> None:
        _one_of(self, "model.input", "channel_order", CHANNEL_ORDERS)
        _one_of(self, "model.input", "size_rounding", SIZE_ROUNDINGS)
        _not_empty(self, "model.input", "min_size_train")
        _at_least(self, "model.input", 1, "min_size_train", "min_size_test", "max_size")
        _at_least(self, "model.input", 0, "size_divisibility")
        _positive(self, "model.input", "pixel_scale", "pixel_std")


@dataclass(frozen=True)
class BackboneConfig:
    depth: int = 50  # 18, 34, 50, 101
    groups: int = 1  # ResNeXt cardinality (32 for X-101 32x8d)
    width_per_group: int = 64
    stride_in_1x1: bool = False  # True for MSRA/Caffe weights, False for torchvision
    norm: str = "FrozenBN"  # "FrozenBN", "BN" or "GN"
    norm_eps: float = 1e-5
    freeze_at: int = 2  # 0: nothing frozen; 1: stem; 2: stem + res2; ...
    fpn: bool = True  # False: the C4 variant (RPN on C4, res5 as RoI head)
    fpn_channels: int = 256

    def __post_init__(self) -> None:
        _one_of(self, "model.backbone", "depth", RESNET_DEPTHS)
        _one_of(self, "model.backbone", "norm", NORMS)
        _at_least(self, "model.backbone", 1, "groups", "width_per_group", "fpn_channels")
        _at_least(self, "model.backbone", 0, "freeze_at")
        _between(self, "model.backbone", 0, math.inf, "norm_eps")


@dataclass(frozen=True)
class RPNConfig:
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_round: bool = True  # torchvision rounds cell anchors to integers
    # "ratio": padded input // map size, as torchvision; "nominal": 4, 8, ..., 64, as Detectron2
    anchor_strides: str = "ratio"
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 2000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    smooth_l1_beta: float = 1.0 / 9  # 0.0 is plain L1 (Detectron2)
    # "torchvision": cls mean over sampled, box sum / #sampled.
    # "detectron2": both sums / (batch_size_per_image * N).
    loss_norm: str = "torchvision"

    def __post_init__(self) -> None:
        _one_of(self, "model.rpn", "loss_norm", LOSS_NORMS)
        _one_of(self, "model.rpn", "anchor_strides", ANCHOR_STRIDES)
        _not_empty(self, "model.rpn", "anchor_sizes")
        _at_least(self, "model.rpn", 1, "anchor_sizes", "batch_size_per_image", "pre_nms_topk_train",
                  "pre_nms_topk_test", "post_nms_topk_train", "post_nms_topk_test")
        _not_empty(self, "model.rpn", "aspect_ratios")
        _positive(self, "model.rpn", "aspect_ratios")
        _between(self, "model.rpn", 0, 1, "fg_iou", "bg_iou", "positive_fraction", "nms_thresh")
        _between(self, "model.rpn", 0, math.inf, "min_size", "smooth_l1_beta")
        if self.bg_iou > self.fg_iou:
            raise ConfigError(f"model.rpn.bg_iou={self.bg_iou} is above model.rpn.fg_iou={self.fg_iou}; "
                              "anchors below bg_iou are background and those from fg_iou up foreground, "
                              "so bg_iou must not exceed fg_iou")


@dataclass(frozen=True)
class RoIHeadsConfig:
    num_classes: int = 90  # foreground classes K; predictors output K + 1
    fg_iou: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    box_pooler_resolution: int = 7
    mask_pooler_resolution: int = 14
    pooler_sampling_ratio: int = 2  # samples per bin and axis; 0: adaptive
    pooler_aligned: bool = False
    box_fc_dim: int = 1024
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float = 1.0 / 9
    mask_conv_dims: tuple[int, ...] = (256, 256, 256, 256)
    # "roi_align_soft": torchvision (RoIAlign, not aligned, no threshold);
    # "binary": rasterise/crop in the box, threshold 0.5 (paper, Detectron2).
    mask_target: str = "roi_align_soft"
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_box_size: float = 1e-2  # torchvision drops detections with a side below this
    # "torchvision": pad 1, integer box, +1 size; "detectron2": grid_sample at pixel centres.
    paste: str = "torchvision"
    mask_threshold: float = 0.5
    # The box and mask heads' initial weights when not loaded (SPEC §1.8-1.9): "torchvision"
    # (PyTorch's defaults, kaiming normal mask predictor) or "detectron2".
    head_init: str = "torchvision"

    def __post_init__(self) -> None:
        _one_of(self, "model.roi_heads", "mask_target", MASK_TARGETS)
        _one_of(self, "model.roi_heads", "head_init", HEAD_INITS)
        _one_of(self, "model.roi_heads", "paste", PASTE_MODES)
        _at_least(self, "model.roi_heads", 1, "num_classes", "batch_size_per_image",
                  "box_pooler_resolution", "mask_pooler_resolution", "box_fc_dim", "mask_conv_dims",
                  "detections_per_img")
        _at_least(self, "model.roi_heads", 0, "pooler_sampling_ratio")
        _between(self, "model.roi_heads", 0, 1, "fg_iou", "positive_fraction", "score_thresh", "nms_thresh",
                 "mask_threshold")
        _positive(self, "model.roi_heads", "box_reg_weights")
        _between(self, "model.roi_heads", 0, math.inf, "smooth_l1_beta", "min_box_size")


@dataclass(frozen=True)
class ModelConfig:
    input: InputConfig = field(default_factory=InputConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)


@dataclass(frozen=True)
class SolverConfig:
    ims_per_batch: int = 16
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adamw" (momentum is then beta1)
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_iter: int = 90000
    max_minutes: float = 0.0  # > 0: stop (and schedule) by wall time; max_iter is then a cap
    schedule: str = "multistep"  # "multistep" or "cosine"
    # Iterations, or fractions of max_iter if < 1; floats so YAML fractions are not read as ints.
    steps: tuple[float, ...] = (60000.0, 80000.0)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 disables
    amp: bool = True  # used only on CUDA
    bf16: bool = False  # opt-in bfloat16 autocast; ~2x faster on CPUs with bf16 instructions
    checkpoint_period: int = 5000  # 0: only at the end
    eval_period: int = 0  # 0: only at the end
    log_period: int = 20

    def __post_init__(self) -> None:
        _one_of(self, "solver", "optimizer", OPTIMIZERS)
        _one_of(self, "solver", "schedule", SCHEDULES)
        _at_least(self, "solver", 1, "ims_per_batch", "log_period")
        _at_least(self, "solver", 0, "max_iter", "warmup_iters", "checkpoint_period", "eval_period")
        _between(self, "solver", 0, math.inf, "base_lr", "weight_decay", "max_minutes", "steps",
                 "clip_grad_norm")
        _between(self, "solver", 0, 1, "warmup_factor")
        _positive(self, "solver", "gamma")
        _numbers(self, "solver", ("momentum",), lambda v: 0 <= v < 1, "from 0 to below 1")


@dataclass(frozen=True)
class DataConfig:
    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    drop_empty: bool = False
    skip_bad: bool = False
    flip_prob: float = 0.5
    num_workers: int = 2
    aspect_ratio_grouping: bool = True

    def __post_init__(self) -> None:
        _at_least(self, "data", 0, "num_workers")
        _between(self, "data", 0, 1, "flip_prob")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        _at_least(self, "", 0, "seed")
        check_device(self.device)


# ---------------------------------------------------------------------------- presets


def torchvision_model() -> ModelConfig:
    """torchvision ``maskrcnn_resnet50_fpn`` conventions (91 outputs incl. background)."""
    return ModelConfig()


def paper_model(num_classes: int = 80) -> ModelConfig:
    """Paper / Detectron2 conventions: MSRA R-50-FPN, BGR 0-255, aligned RoIAlign, L1 losses."""
    return ModelConfig(
        input=InputConfig(
            channel_order="BGR",
            pixel_scale=255.0,
            pixel_mean=(103.53, 116.28, 123.675),
            pixel_std=(1.0, 1.0, 1.0),
            min_size_train=(640, 672, 704, 736, 768, 800),
            size_rounding="round",
        ),
        backbone=BackboneConfig(stride_in_1x1=True),
        rpn=RPNConfig(anchor_round=False, anchor_strides="nominal", post_nms_topk_train=1000,
                      min_size=0.0, smooth_l1_beta=0.0, loss_norm="detectron2"),
        roi_heads=RoIHeadsConfig(
            num_classes=num_classes,
            pooler_sampling_ratio=0,
            pooler_aligned=True,
            smooth_l1_beta=0.0,
            mask_target="binary",
            head_init="detectron2",
            min_box_size=0.0,
            paste="detectron2",
        ),
    )


def small_cpu_model(num_classes: int = 3) -> ModelConfig:
    """ResNet-18-FPN trained from scratch on a CPU: trainable BN, small images, fewer RoIs.

    Most of a CPU training step is convolution, so the RoI budget (64 per image, at most 16
    foreground) and a two-conv mask head keep the second stage cheap; anchors start at 16 px
    because objects in small images are small.
    """
    return ModelConfig(
        input=InputConfig(min_size_train=(256,), min_size_test=256, max_size=384),
        backbone=BackboneConfig(depth=18, norm="BN", freeze_at=0, fpn_channels=64),
        rpn=RPNConfig(anchor_sizes=(16, 32, 64, 128, 256), pre_nms_topk_train=500,
                      post_nms_topk_train=300, pre_nms_topk_test=500, post_nms_topk_test=300,
                      batch_size_per_image=128),
        roi_heads=RoIHeadsConfig(num_classes=num_classes, batch_size_per_image=64,
                                 box_fc_dim=512, mask_conv_dims=(128, 128),
                                 pooler_sampling_ratio=0, pooler_aligned=True,
                                 mask_target="binary", paste="detectron2", head_init="detectron2"),
    )


def small_cpu_solver() -> SolverConfig:
    """The recipe that trains the small CPU model from scratch in minutes: AdamW (far faster
    than SGD from random weights over a few hundred iterations), batch 4, a short warm-up and a
    cosine schedule sized by the trainer to end at ``max_minutes`` of wall time."""
    return SolverConfig(ims_per_batch=4, optimizer="adamw", base_lr=1e-3, schedule="cosine",
                        warmup_iters=50, max_iter=100_000, max_minutes=15.0, checkpoint_period=200,
                        log_period=10)


PRESETS = {
    "torchvision": torchvision_model,
    "paper": paper_model,
    "small_cpu": small_cpu_model,
}
# Presets whose training recipe differs from SolverConfig's defaults.
SOLVER_PRESETS = {"small_cpu": small_cpu_solver}


def preset_config(name: str) -> Config:
    """The whole config a preset names: its model and, where it has one, its training recipe.

    >>> preset_config("small_cpu").solver.optimizer
    'adamw'
    """
    return Config(model=PRESETS[name](), solver=SOLVER_PRESETS.get(name, SolverConfig)())


# ----------------------------------------------------------------- dict / override glue


def to_dict(obj: Any) -> Any:
    """A config as nested plain dicts/lists (for YAML and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    known, defaults = {f.name: f for f in fields(cls)}, cls()
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(
                f"unknown config key '{path}'; valid keys here: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(getattr(defaults, key), value, path)
    return cls(**kwargs)


def _coerce(default: Any, value: Any, path: str) -> Any:
    """``value`` converted to the type of the field's ``default``; ConfigError names ``path``."""
    if dataclasses.is_dataclass(default):
        return from_dict(type(default), value, path)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = default[0] if default else value[0] if value else None
        return tuple(_coerce(inner, v, path) for v in value)
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{path}' expects true/false, got {value!r}")
    for kind in (int, float):
        if isinstance(default, kind) and not isinstance(default, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"config key '{path}' expects a number, got {value!r}") from None
            if kind is float:
                return number
            if not number.is_integer():
                raise ConfigError(f"config key '{path}' expects a whole number, got {value!r}")
            return int(number)
    if isinstance(default, str):
        return str(value)
    return value


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``key.sub=value`` strings (YAML-parsed values) to a config."""
    import yaml

    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. solver.base_lr=0.01")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key '{key}'")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key '{key}'")
        node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(Config, data)


def replace_nested(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that accepts dotted keys: ``replace_nested(c, **{"a.b": 1})``."""
    direct, nested = {}, {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[key] = value
    for head, sub in nested.items():
        direct[head] = replace_nested(getattr(config, head), **sub)
    return replace(config, **direct)
