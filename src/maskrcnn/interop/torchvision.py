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


def read_state_dict(source: str | Path | dict) -> dict[str, Tensor]:
    """A state dict from a dict, a ``.pth`` file (tensors only, never arbitrary objects) or
    a ``.safetensors`` file."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]  # torchvision's reference scripts save {"model": ..., "optimizer": ...}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(data).__name__}")
    return data


def convert_state_dict(tv: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ``maskrcnn_resnet50_fpn`` keys and tensors -> this project's."""
    out = {}
    for key, value in tv.items():
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("roi_heads.box_predictor.bbox_pred."):
            value = value[4:]  # drop the background's 4 regression outputs
        elif key.startswith("roi_heads.mask_head.predictor."):
            value = value[1:]  # drop the background mask channel
        out[key] = value
    return out


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
    initial weights and the report lists them.

    >>> model = from_torchvision("maskrcnn_resnet50_fpn_coco.pth")  # doctest: +SKIP
    """
    tv = read_state_dict(source)
    if "roi_heads.box_predictor.cls_score.weight" not in tv:
        raise ValueError("not a torchvision Mask R-CNN state dict: no "
                         "'roi_heads.box_predictor.cls_score.weight' key")
    cfg, state = torchvision_config(tv, num_classes, norm_eps), convert_state_dict(tv)
    model = build_model(cfg, random_init=False)
    report = load_matching(model, state)
    if report.missing or report.mismatched:  # those layers keep their random initialisation
        model = build_model(cfg)
        report = load_matching(model, state)
    model.load_report = report
    if verbose and (report.missing or report.unexpected or report.mismatched):
        print(report)
    return model


def load_backbone_weights(model: MaskRCNN, source: str | Path | dict) -> LoadReport:
    """Load ImageNet ResNet weights (torchvision layout: conv1, bn1, layer1-4, fc) into the
    body; for the C4 model ``layer4`` goes to the shared res5 head. ``fc`` is ignored."""
    sd = read_state_dict(source)
    c4 = model.roi_heads.res5 is not None
    mapped = {}
    for key, value in sd.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if c4 and key.startswith("layer4."):
            mapped["roi_heads.res5." + key[len("layer4."):]] = value
        else:
            mapped["backbone.body." + key] = value
    report = load_matching(model, mapped, ignore_missing=("backbone.fpn", "rpn.", "roi_heads.box",
                                                          "roi_heads.mask"))
    if not report.loaded:
        raise ValueError("no backbone tensor matched: expected torchvision ResNet keys "
                         "such as 'conv1.weight' and 'layer1.0.conv1.weight'")
    return report
