"""Weights saved from torchvision, converted at the border to this project's layout and conventions.

torchvision differs from the internal layout in names and in the background slot: its box
regressor has 4(K+1) outputs and its mask predictor K+1 channels, with background first;
here both are class-specific for the K foreground classes only. This module reads state dicts
only; it does not import torchvision.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from maskrcnn.config import ModelConfig, torchvision_model
from maskrcnn.interop.loading import LoadReport, load_matching
from maskrcnn.modeling.mask_rcnn import MaskRCNN, build_model

_RENAMES = [
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?", r"backbone.fpn.lateral.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?", r"backbone.fpn.output.\1."),
    (r"^rpn\.head\.conv\.(?:0\.0\.)?", "rpn.head.conv."),
    (r"^rpn\.head\.cls_logits\.", "rpn.head.objectness."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.head.deltas."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", r"roi_heads.mask_head.convs.\1."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.", lambda m: f"roi_heads.mask_head.convs.{int(m[1]) - 1}."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_heads.mask_head.deconv."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_heads.mask_head.predictor."),
]


# The layers whose shapes follow the number of classes.
_CLASS_KEYS = {f"roi_heads.{layer}.{p}" for layer in ("box_predictor.cls_score", "box_predictor.bbox_pred",
                                                      "mask_head.predictor") for p in ("weight", "bias")}


def read_state_dict(source: str | Path | dict) -> dict[str, Tensor]:
    """A state dict from a dict, a ``.pth`` file (tensors only, never arbitrary objects) or
    a ``.safetensors`` file."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    not_tensors = ValueError(f"{path}: not a state dict of tensors; save one with "
                             "torch.save(model.state_dict(), path)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # an unreadable file: the system's message says why
    except Exception:  # noqa: BLE001 - pickle, zip and safetensors raise many types for other files
        raise not_tensors from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]  # torchvision's reference scripts save {"model": ..., "optimizer": ...}
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise not_tensors
    return data


def convert_state_dict(tv: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ``maskrcnn_resnet50_fpn`` keys and tensors -> this project's."""
    out = {}
    for key, value in tv.items():
        key = _our_key(key)
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("roi_heads.box_predictor.bbox_pred."):
            value = value[4:]  # drop the background's 4 regression outputs
        elif key.startswith("roi_heads.mask_head.predictor."):
            value = value[1:]  # drop the background mask channel
        out[key] = value
    return out


def _our_key(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def torchvision_config(tv: dict[str, Tensor], num_classes: int | None = None,
                       norm_eps: float | None = None) -> ModelConfig:
    """The model config that reproduces the torchvision model these weights came from.

    A backbone saved with trainable BatchNorm (``num_batches_tracked`` present, e.g. built
    without pretrained weights) keeps batch statistics in training; otherwise FrozenBN with
    torchvision's eps 0.0 for its COCO weights (pass ``norm_eps`` to override).
    """
    cfg = torchvision_model()
    trainable_bn = any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in tv)
    norm = "BN" if trainable_bn else "FrozenBN"
    eps = norm_eps if norm_eps is not None else (1e-5 if trainable_bn else 0.0)
    k = tv["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    return replace(
        cfg,
        backbone=replace(cfg.backbone, norm=norm, norm_eps=eps, freeze_at=0 if trainable_bn else 2),
        roi_heads=replace(cfg.roi_heads, num_classes=num_classes or k))


def from_torchvision(source: str | Path | dict, num_classes: int | None = None,
                     norm_eps: float | None = None, verbose: bool = True) -> MaskRCNN:
    """A model with torchvision's conventions from a ``maskrcnn_resnet50_fpn`` state dict.

    With ``num_classes`` different from the file's, every class-dependent layer keeps its
    initial weights and the report lists them (under the file's keys and shapes). A file with
    other layers (another depth, no mask head) is refused with a ValueError naming them.

    >>> model = from_torchvision("maskrcnn_resnet50_fpn_coco.pth")  # doctest: +SKIP
    """
    tv = read_state_dict(source)
    name = _source_name(source)
    if "roi_heads.box_predictor.cls_score.weight" not in tv:
        raise ValueError(f"{name}: not a torchvision Mask R-CNN state dict: no "
                         "'roi_heads.box_predictor.cls_score.weight' key")
    cfg, state = torchvision_config(tv, num_classes, norm_eps), convert_state_dict(tv)
    model = build_model(cfg, random_init=False)
    report = load_matching(model, state)
    file_key = {_our_key(k): k for k in tv}
    other = [file_key[k] for k in report.unexpected] + [
        f"{file_key[k]} {theirs}" for k, theirs, _ in report.mismatched if k not in _CLASS_KEYS]
    if report.missing or other:
        raise ValueError(f"{name}: not a torchvision maskrcnn_resnet50_fpn state dict: " + "; ".join(
            f"{what} {', '.join(keys[:3])}{f' ({len(keys)} in all)' if len(keys) > 3 else ''}"
            for what, keys in (("missing", report.missing), ("not in the model:", other)) if keys))
    if report.mismatched:  # the class-dependent layers keep their random initialisation
        model = build_model(cfg)
        report = load_matching(model, state)
    report.mismatched = [(file_key[k], tuple(tv[file_key[k]].shape), ours) for k, _, ours in report.mismatched]
    model.load_report = report
    if verbose and report.mismatched:
        print(report)
    return model


def load_backbone_weights(model: MaskRCNN, source: str | Path | dict) -> LoadReport:
    """Load ImageNet ResNet weights (torchvision layout: conv1, bn1, layer1-4, fc) into the
    body; for the C4 model ``layer4`` goes to the shared res5 head. ``fc`` is ignored. Weights
    that do not fill the backbone exactly (another depth or width, another kind of file) are
    refused with a ValueError before anything is loaded, as is a model whose pixel conventions
    or stride position are not the ones those weights were trained with (the paper preset's are
    those of MSRA's Caffe weights)."""
    changes = _torchvision_conventions(model.config)
    if changes:
        raise ValueError("torchvision's ImageNet ResNets take RGB pixels in [0, 1] normalised by "
                         "ImageNet's mean and std, with the stride on the 3x3 conv; this model is set up "
                         f"otherwise: set {' '.join(changes)}")
    sd = read_state_dict(source)
    c4 = model.roi_heads.res5 is not None
    file_key = {}  # the model's key -> the file's
    for key in sd:
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if c4 and key.startswith("layer4."):
            file_key["roi_heads.res5." + key[len("layer4."):]] = key
        else:
            file_key["backbone.body." + key] = key
    own = model.state_dict()
    missing = [k for k in own if k.startswith(("backbone.body.", "roi_heads.res5."))
               and not k.endswith("num_batches_tracked") and k not in file_key]
    # BN's running statistics have no place in a norm without them (GN): left out
    file_key = {k: key for k, key in file_key.items() if k in own or not (
        k.endswith(("running_mean", "running_var")) and k.rsplit(".", 1)[0] + ".weight" in own)}
    other = [f"{key} {tuple(sd[key].shape)}" for k, key in file_key.items()
             if k not in own or sd[key].shape != own[k].shape]
    if missing or other:
        name = _source_name(source)
        ours = model.config.backbone.depth
        blocks = {tuple(k.split(".")[:2]) for k in sd if k.startswith("layer")}
        depth = 2 + len(blocks) * (3 if any(".conv3." in k for k in sd) else 2)  # 3 or 2 convs a block
        if not blocks:
            what = "holds no torchvision ResNet weights (keys such as 'layer1.0.conv1.weight')"
        elif depth != ours:
            what = f"holds ResNet-{depth} weights, but the model's backbone is a ResNet-{ours}"
        else:
            what = f"holds ResNet-{depth} weights that do not fit the model's backbone"
        raise ValueError(f"{name} {what} ({len(missing)} of its tensors not in the file, {len(other)} in "
                         f"the file not in it or of another shape, e.g. {', '.join((other or missing)[:2])}); "
                         f"pass torchvision's ImageNet resnet{ours} weights, or set model.backbone.depth")
    return load_matching(model, {k: sd[key] for k, key in file_key.items()},
                         ignore_missing=("backbone.fpn", "rpn.", "roi_heads.box", "roi_heads.mask"))


def _source_name(source: str | Path | dict) -> str:
    return "the state dict" if isinstance(source, dict) else str(source)


def _torchvision_conventions(cfg: ModelConfig) -> list[str]:
    """The overrides that give a model config torchvision's pixel conventions and stride position."""
    tv = torchvision_model()
    changes = [f"model.input.{name}={_override_value(getattr(tv.input, name))}"
               for name in ("channel_order", "pixel_scale", "pixel_mean", "pixel_std")
               if getattr(cfg.input, name) != getattr(tv.input, name)]
    if cfg.backbone.stride_in_1x1:
        changes.append("model.backbone.stride_in_1x1=false")
    return changes


def _override_value(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)
