"""Mask R-CNN: backbone -> RPN -> RoI heads (box + mask), and ``build_model`` wiring it from a config.

Train mode: ``model(images, targets)`` returns the five losses (SPEC §2.5).
Eval mode: ``model(images)`` returns per image boxes, labels, scores and masks in the input's pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from maskrcnn.config import ModelConfig
from maskrcnn.modeling.anchors import AnchorGenerator
from maskrcnn.modeling.box_head import BoxHead, BoxPredictor
from maskrcnn.modeling.fpn import FPN
from maskrcnn.modeling.mask_head import MaskHead
from maskrcnn.modeling.poolers import MultiLevelRoIAlign
from maskrcnn.modeling.resnet import BLOCKS, ResNet, fold_norms, fuse_block_ends, make_stage, stage_options
from maskrcnn.modeling.roi_heads import RoIHeads
from maskrcnn.modeling.rpn import RPN, RPNHead
from maskrcnn.modeling.transform import postprocess, preprocess
from maskrcnn.ops.winograd import use_winograd
from maskrcnn.precision import bf16_autocast, check_bf16

FPN_STRIDES = (4, 8, 16, 32)


class Backbone(nn.Module):
    """ResNet body, plus FPN when given. Returns the maps the RPN uses; the RoI heads use
    the first ``num_roi_levels`` of them (P2-P5 with FPN, C4 without)."""

    def __init__(self, body: ResNet, fpn: FPN | None):
        super().__init__()
        self.body, self.fpn = body, fpn
        self.out_channels = fpn.out_channels if fpn is not None else body.out_channels[-1]
        self.num_roi_levels = 4 if fpn is not None else 1

    def forward(self, x: Tensor) -> list[Tensor]:
        c = self.body(x)
        return self.fpn(c) if self.fpn is not None else [c[-1]]


class MaskRCNN(nn.Module):
    def __init__(self, *, backbone: Backbone, rpn: RPN, roi_heads: RoIHeads, config: ModelConfig):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads
        self.config = config
        self.bf16 = False
        self.channels_last = False  # set by use_channels_last

    @property
    def num_classes(self) -> int:
        return self.config.roi_heads.num_classes

    def optimize_for_inference(self) -> "MaskRCNN":
        """The CPU fast path, for a model that will only predict from now on: fixed-statistics
        norms are folded into the convs before them, every conv runs on channels-last tensors
        (the layout of the CPU convolution kernels, oneDNN), each residual block ends in one
        fused conv + sum + ReLU and its other convs write through their ReLU
        (``ops.conv_relu``), and the 3x3 convs with 128 or more channels run by Winograd's
        F(4x4, 3x3) in float32 on the CPU (``ops.winograd``: about twice as fast as oneDNN on
        the 256-channel P2 conv), the 3x3 end convs of such ResNet-18/34 blocks included, which
        are then not fused. Float rounding differs from the plain path (about 1e-5 of each
        Winograd conv's output scale); the state dict no longer matches a training checkpoint."""
        self.eval()
        fold_norms(self.backbone.body)
        fuse_block_ends(self.backbone.body)
        if self.roi_heads.res5 is not None:
            fold_norms(self.roi_heads.res5)
            fuse_block_ends(self.roi_heads.res5)
        self.use_channels_last()
        use_winograd(self)
        return self

    def use_channels_last(self, enabled: bool = True) -> "MaskRCNN":
        """Weights and activations in channels-last memory, the layout of the CPU convolution
        kernels (oneDNN): in PyTorch's default layout every convolution reorders its weights and
        inputs, forward and backward (a float32 training step of the small CPU preset on two
        Xeon cores: 0.45 s instead of 0.49 s). The trainer turns it on for training on the CPU.
        Call it before building an optimizer: a fused one expects its state in its parameters'
        layout. The bf16 mode is channels-last whatever this says."""
        self.channels_last = enabled
        self.to(memory_format=torch.channels_last if enabled or self.bf16 else torch.contiguous_format)
        return self

    def use_bf16(self, enabled: bool = True) -> "MaskRCNN":
        """Opt-in: convolutions and matrix products in bfloat16 (see ``maskrcnn.precision``),
        in training and inference. About twice as fast on CPUs with bf16 instructions; raises a
        ValueError on a device without them. Changes the outputs slightly.

        Weights and activations are then channels-last (``use_channels_last``), the layout of
        oneDNN's bf16 kernels; turning bf16 off restores the layout ``use_channels_last`` set.
        Call it before building an optimizer: a fused one expects its state in its parameters'
        layout."""
        if enabled:
            check_bf16(next(self.parameters()).device)
        self.bf16 = enabled
        channels_last = enabled or self.channels_last
        self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return self

    def forward(self, images: list[Tensor], targets: list[dict] | None = None, *,
                min_score: float = 0.0):
        """images: list of (3, H_i, W_i) RGB, uint8 or float in [0, 1]; in eval mode an empty
        list gives an empty list.

        targets (train mode): per image ``boxes`` (G, 4) xyxy in image pixels, ``labels`` (G,)
        in 1..K and ``masks``: a compact mask structure or a (G, H, W) tensor.

        min_score (eval mode): detections scoring below it are dropped before the mask head
        and pasting, so only those kept get masks; they are the same as without it.
        """
        if self.training:
            if targets is None:
                raise ValueError("in train mode the model needs targets; call model.eval() to predict")
            check_targets(targets)
        elif not images:
            return []
        batch, targets, mask_scales = preprocess(images, targets, self.config.input, self.training)
        x = batch.tensor
        if self.channels_last or self.bf16:  # oneDNN's fast layout; NCHW costs reorders per conv
            x = x.contiguous(memory_format=torch.channels_last)
        with bf16_autocast(x.device.type, self.bf16):
            features = self.backbone(x)
            padded_hw = tuple(x.shape[-2:])
            gt_boxes = [t["boxes"] for t in targets] if self.training else None
            proposals, losses = self.rpn(features, padded_hw, batch.image_sizes, gt_boxes)
            roi_features = features[: self.backbone.num_roi_levels]
            if self.training:
                losses.update(self.roi_heads.forward_train(roi_features, proposals, targets, mask_scales))
                return losses
            results = self.roi_heads.forward_test(roi_features, proposals, batch.image_sizes, min_score)
        cfg = self.config.roi_heads
        return postprocess(results, batch.image_sizes, [tuple(im.shape[-2:]) for im in images],
                           paste=cfg.paste, threshold=cfg.mask_threshold)


def check_targets(targets: list[dict]) -> None:
    """Reject boxes the losses cannot use, naming the image, before they turn into NaNs."""
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must have shape (N, 4), got {tuple(boxes.shape)}")
        bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            box = boxes[bad.nonzero()[0, 0]].tolist()
            raise ValueError(f"target {i}: box {box} has non-positive width or height; boxes are "
                             "(x1, y1, x2, y2) in pixels (convert COCO [x, y, w, h] first)")


class _SkipInit(TorchFunctionMode):
    """While active, layer initialisation does nothing: ``torch.nn.init``'s functions, and the
    ``Tensor.uniform_`` and ``normal_`` draws that some of them make directly, leave each tensor
    as allocated, uninitialised, for a state dict to fill."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" or func in (Tensor.uniform_, Tensor.normal_):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build_model(cfg: ModelConfig, random_init: bool = True) -> MaskRCNN:
    """Assemble Mask R-CNN from a model config.

    ``random_init=False`` skips the layers' random initialisation (for R50-FPN, about 0.4 s on
    two cores) for a model whose every weight is then loaded with a strict ``load_state_dict``.

    >>> from maskrcnn.config import small_cpu_model
    >>> model = build_model(small_cpu_model(num_classes=3))
    >>> model.roi_heads.box_predictor.cls_score.out_features
    4
    """
    if not random_init:
        with _SkipInit():
            return build_model(cfg)
    b, r = cfg.backbone, cfg.rpn
    body = ResNet(depth=b.depth, groups=b.groups, width_per_group=b.width_per_group,
                  stride_in_1x1=b.stride_in_1x1, norm=b.norm, eps=b.norm_eps,
                  freeze_at=b.freeze_at, with_res5=b.fpn)
    if b.fpn:
        backbone = Backbone(body, FPN(body.out_channels, b.fpn_channels))
        anchor_sizes = [(s,) for s in r.anchor_sizes]
        strides = (*FPN_STRIDES, 64)  # P6 feeds the RPN too
    else:
        backbone = Backbone(body, None)
        anchor_sizes = [tuple(r.anchor_sizes)]  # C4: every size on the one stride-16 map
        strides = (16,)
    anchors = AnchorGenerator(anchor_sizes, r.aspect_ratios, r.anchor_round,
                              strides if r.anchor_strides == "nominal" else None)
    rpn = RPN(head=RPNHead(backbone.out_channels, anchors.num_anchors), anchors=anchors,
              fg_iou=r.fg_iou, bg_iou=r.bg_iou, batch_size_per_image=r.batch_size_per_image,
              positive_fraction=r.positive_fraction,
              pre_nms_topk=(r.pre_nms_topk_train, r.pre_nms_topk_test),
              post_nms_topk=(r.post_nms_topk_train, r.post_nms_topk_test),
              nms_thresh=r.nms_thresh, min_size=r.min_size, smooth_l1_beta=r.smooth_l1_beta,
              loss_norm=r.loss_norm)
    return MaskRCNN(backbone=backbone, rpn=rpn, roi_heads=_build_roi_heads(cfg, backbone), config=cfg)


def _build_roi_heads(cfg: ModelConfig, backbone: Backbone) -> RoIHeads:
    b, h = cfg.backbone, cfg.roi_heads
    pool = dict(sampling_ratio=h.pooler_sampling_ratio, aligned=h.pooler_aligned)
    if b.fpn:
        c = backbone.out_channels
        res5 = None
        box_pooler = MultiLevelRoIAlign(output_size=h.box_pooler_resolution, strides=FPN_STRIDES, **pool)
        mask_pooler = MultiLevelRoIAlign(output_size=h.mask_pooler_resolution, strides=FPN_STRIDES, **pool)
        box_head = BoxHead(c * h.box_pooler_resolution**2, h.box_fc_dim, init=h.head_init)
        mask_head = MaskHead(c, h.mask_conv_dims, h.num_classes, init=h.head_init)
    else:
        # C4 (SPEC §5.1): pool 14x14 from C4, run res5 (stride 2) -> 7x7, shared by both branches.
        block, counts = BLOCKS[b.depth]
        kw = stage_options(block, 3, norm=b.norm, eps=b.norm_eps, groups=b.groups,
                           width_per_group=b.width_per_group, stride_in_1x1=b.stride_in_1x1)
        res5 = make_stage(block, backbone.out_channels, 512, counts[3], 2, **kw)
        c = 512 * block.expansion
        box_pooler = MultiLevelRoIAlign(output_size=h.mask_pooler_resolution, strides=(16,), **pool)
        mask_pooler = None
        box_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        box_head.out_features = c
        mask_head = MaskHead(c, (), h.num_classes, deconv_dim=256, init=h.head_init)
    return RoIHeads(
        box_pooler=box_pooler, box_head=box_head,
        box_predictor=BoxPredictor(box_head.out_features, h.num_classes, init=h.head_init),
        mask_pooler=mask_pooler, mask_head=mask_head, res5=res5, fg_iou=h.fg_iou,
        batch_size_per_image=h.batch_size_per_image, positive_fraction=h.positive_fraction,
        box_reg_weights=h.box_reg_weights, smooth_l1_beta=h.smooth_l1_beta,
        mask_target=h.mask_target, score_thresh=h.score_thresh, nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img, min_box_size=h.min_box_size)
