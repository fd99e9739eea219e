"""ResNet / ResNeXt bodies (He et al. 2016; Xie et al. 2017) used as the Mask R-CNN backbone.

The stage outputs C2..C5 have strides 4, 8, 16, 32 (SPEC §1.2). Parameter names follow the
common ``conv1/bn1/layerN`` layout so ImageNet weights map onto them one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.conv_relu import conv_relu, onednn_fusable


def norm_scale_and_shift(weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                         eps: float) -> tuple[Tensor, Tensor]:
    """The per-channel ``(C,)`` scale and shift of a batch norm with fixed statistics:
    ``weight / sqrt(var + eps)`` and ``bias - mean * scale`` (no affine part: weight 1, bias 0)."""
    scale = (var + eps).rsqrt()
    if weight is not None:
        scale = weight * scale
    return scale, (-mean * scale if bias is None else bias - mean * scale)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters: ``y = x * scale + shift``.

    Used when the batch per device is too small for useful statistics (SPEC §1.2).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(C,)`` scale and shift that this layer applies."""
        return norm_scale_and_shift(self.weight, self.bias, self.running_mean, self.running_var, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (N, C, H, W) -> (N, C, H, W)."""
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved from a trainable BatchNorm carry a counter that has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, channels: int, eps: float = 1e-5) -> nn.Module:
    """``"FrozenBN"``, ``"BN"`` (trainable, batch statistics) or ``"GN"`` (32 groups)."""
    if kind == "FrozenBN":
        return FrozenBatchNorm2d(channels, eps)
    if kind == "BN":
        return nn.BatchNorm2d(channels, eps=eps)
    if kind == "GN":
        return nn.GroupNorm(32, channels, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; use FrozenBN, BN or GN")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, *, stride: int, norm: str, eps: float, **_):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, width, eps)
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, out_ch, eps)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm, eps)
        self.fused_end = False  # set by ``fuse_block_ends``

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_norm_relu(self.conv1, self.bn1, x)
        return residual_relu(self.conv2, self.bn2, out, identity, self.fused_end)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1, with the stride on the 1x1 (MSRA) or 3x3."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, *, stride: int, norm: str, eps: float,
                 groups: int = 1, group_width: int | None = None, stride_in_1x1: bool = False):
        super().__init__()
        out_ch = width * self.expansion
        inner = group_width * groups if group_width else width
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, inner, 1, s1, bias=False)
        self.bn1 = make_norm(norm, inner, eps)
        self.conv2 = nn.Conv2d(inner, inner, 3, s3, 1, groups=groups, bias=False)
        self.bn2 = make_norm(norm, inner, eps)
        self.conv3 = nn.Conv2d(inner, out_ch, 1, bias=False)
        self.bn3 = make_norm(norm, out_ch, eps)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm, eps)
        self.fused_end = False  # set by ``fuse_block_ends``

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_norm_relu(self.conv1, self.bn1, x)
        out = conv_norm_relu(self.conv2, self.bn2, out)
        return residual_relu(self.conv3, self.bn3, out, identity, self.fused_end)


def residual_relu(conv: nn.Module, norm: nn.Module, x: Tensor, identity: Tensor,
                  fused: bool = False) -> Tensor:
    """The end of a residual block: relu(norm(conv(x)) + identity), (N, C, H, W).

    ``fused`` (inference only; see ``fuse_block_ends``): with the norm folded into a plain conv
    and float32 channels-last CPU maps outside autograd, one oneDNN call does the conv with the
    sum and the ReLU as post-ops, writing into ``identity``'s memory: no fresh output map and no
    separate passes over it. Otherwise the plain ops, the sum in place on the norm's output (no
    backward needs it, and big maps stay put)."""
    if fused and _fusable(conv, norm, x, identity):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            identity, x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation,
            conv.groups, "add", 1.0, "relu", [], None)
    out = norm(conv(x))
    out += identity
    return F.relu(out, inplace=True)


def _fusable(conv: nn.Module, norm: nn.Module, x: Tensor, identity: Tensor) -> bool:
    return (isinstance(norm, nn.Identity) and onednn_fusable(conv, x) and identity.dtype == x.dtype
            and identity.is_contiguous(memory_format=torch.channels_last))


def conv_norm_relu(conv: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
    """relu(norm(conv(x))), (N, C, H, W); in one pass over the output (``ops.conv_relu``) once
    ``fold_norms`` has put the norm into the conv."""
    if isinstance(norm, nn.Identity):
        return conv_relu(conv, x)
    return F.relu(norm(conv(x)), inplace=True)


def fuse_block_ends(module: nn.Module) -> int:
    """Let every residual block in ``module`` end in one fused conv + sum + ReLU when predicting
    (``residual_relu``). The block then writes its output over its shortcut's input, so only for
    a model that only predicts, after ``fold_norms``. Returns the number of blocks."""
    blocks = [m for m in module.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for block in blocks:
        block.fused_end = True
    return len(blocks)


def _shortcut(in_ch: int, out_ch: int, stride: int, norm: str, eps: float) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), make_norm(norm, out_ch, eps))


BLOCKS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
          50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3]),
          152: (Bottleneck, [3, 8, 36, 3])}


def stage_options(block: type, index: int, *, norm: str, eps: float, groups: int = 1,
                  width_per_group: int = 64, stride_in_1x1: bool = False) -> dict:
    """``make_stage``'s keyword arguments for stage ``index`` (0: res2 ... 3: res5). ResNeXt
    32x8d: the first stage's grouped conv is 32 * 8 = 256 wide, doubling per stage."""
    kw = dict(norm=norm, eps=eps)
    if block is Bottleneck:
        kw.update(groups=groups, stride_in_1x1=stride_in_1x1)
        if groups > 1 or width_per_group != 64:
            kw["group_width"] = width_per_group * 2**index
    return kw


def make_stage(block: type, in_ch: int, width: int, count: int, stride: int, **kw) -> nn.Sequential:
    """``count`` blocks; the first carries the stride and the projection shortcut."""
    layers = []
    for i in range(count):
        layers.append(block(in_ch, width, stride=stride if i == 0 else 1, **kw))
        in_ch = width * block.expansion
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet body returning C2..C5 (or C2..C4 when ``with_res5`` is False, for the C4 model).

    ``freeze_at``: 0 trains everything; 1 freezes the stem; k >= 2 also freezes res2..res_k.
    """

    def __init__(self, *, depth: int = 50, groups: int = 1, width_per_group: int = 64,
                 stride_in_1x1: bool = False, norm: str = "FrozenBN", eps: float = 1e-5,
                 freeze_at: int = 2, with_res5: bool = True):
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS)}, got {depth}")
        block, counts = BLOCKS[depth]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = make_norm(norm, 64, eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch, self.out_channels = 64, []
        for i, count in enumerate(counts if with_res5 else counts[:3]):
            width = 64 * 2**i
            kw = stage_options(block, i, norm=norm, eps=eps, groups=groups,
                               width_per_group=width_per_group, stride_in_1x1=stride_in_1x1)
            stage = make_stage(block, in_ch, width, count, 1 if i == 0 else 2, **kw)
            self.add_module(f"layer{i + 1}", stage)
            in_ch = width * block.expansion
            self.out_channels.append(in_ch)
        self.num_stages = len(self.out_channels)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients to the stem (``freeze_at >= 1``) and res2..res_k (``freeze_at = k``)."""
        names = (["conv1", "bn1"] if freeze_at >= 1 else []) + [
            f"layer{i}" for i in range(1, min(freeze_at, self.num_stages + 1))]
        for name in names:
            module = freeze_batchnorm(getattr(self, name))
            setattr(self, name, module)
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x``: (N, 3, H, W) -> [C2 (N, c2, H/4, W/4), C3 (H/8), C4 (H/16), C5 (H/32)]."""
        # ReLU after the max pool: it is monotone, so the values are those of pooling the ReLU's
        # output, the gradients too (a window whose maximum is <= 0 passes none either way),
        # and the ReLU runs on a quarter of the pixels.
        x = self.relu(self.maxpool(self.bn1(self.conv1(x))))
        outputs = []
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
            outputs.append(x)
        return outputs


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every trainable ``BatchNorm2d`` in ``module`` by a ``FrozenBatchNorm2d`` copy."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, freeze_batchnorm(child))
    return module


def _norm_affine(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    if isinstance(norm, FrozenBatchNorm2d):
        return norm.scale_and_shift()
    if isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats:
        return norm_scale_and_shift(norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps)
    return None  # GroupNorm, or BatchNorm still using batch statistics


@torch.no_grad()
def fold_norms(module: nn.Module) -> int:
    """Fold each fixed-statistics norm into the conv before it (inference only): the conv
    gets the norm's scale in its weights and its shift as bias. Returns the number folded."""
    folded = 0
    for parent in module.modules():
        pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
        for conv_name, norm_name in pairs:
            conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
            if isinstance(conv, nn.Conv2d) and norm is not None:
                folded += _fold_pair(parent, conv_name, norm_name)
        if isinstance(parent, nn.Sequential) and len(parent) == 2 and isinstance(parent[0], nn.Conv2d):
            folded += _fold_pair(parent, "0", "1")
    return folded


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> int:
    conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
    affine = _norm_affine(norm)
    if affine is None:
        return 0
    scale, shift = affine
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1))  # keeps its memory format
    conv.bias = nn.Parameter(bias * scale + shift)
    setattr(parent, norm_name, nn.Identity())
    return 1
