"""RoIAlign forward, and forward + backward: ours against torchvision's C++ kernel, side by side.

    python benchmarks/bench_roi_align.py [--threads 2] [--repeats 7]

Each workload pools from one FPN-level map of 256 channels. The two implementations run
alternately, so both see the same machine state; the table shows wall-clock medians and the
ratio ours / torchvision (below 1 means ours is faster).
"""

from __future__ import annotations

import torch
import torchvision.ops
from common import alternate, parser

from maskrcnn.ops import roi_align

WORKLOADS = [
    # (name, rois, channels, feature (H, W), output, spatial scale, sampling ratio, aligned)
    ("512 RoIs, 256 ch, 7x7 (box head)", 512, 256, (200, 272), 7, 0.25, 2, False),
    ("128 RoIs, 256 ch, 14x14 (mask head)", 128, 256, (200, 272), 14, 0.25, 2, False),
    ("512 RoIs, 256 ch, 7x7, aligned, adaptive", 512, 256, (100, 136), 7, 0.125, 0, True),
]


def make_rois(n: int, image_hw: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """(n, 5) boxes in one image: corners anywhere in the first 80%, sides 8 px to 20% of it."""
    h, w = image_hw
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.2, h * 0.2])
    return torch.cat([torch.zeros(n, 1), xy, xy + wh], 1)


def step(op, feature, rois, grad, out, scale, ratio, aligned, backward):
    def run():
        y = op(feature, rois, out, scale, ratio, aligned)
        if backward:
            y.backward(grad)
            feature.grad = None
    return run


def main() -> None:
    args = parser(__doc__, repeats=7).parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {args.threads} threads, "
          f"median of {args.repeats} alternating runs")
    print(f"{'workload':42s} {'pass':8s} {'ours ms':>9s} {'tv ms':>9s} {'ours/tv':>8s}")
    for name, n, c, (fh, fw), out, scale, ratio, aligned in WORKLOADS:
        feature = torch.randn(1, c, fh, fw, generator=g, requires_grad=True)
        rois = make_rois(n, (fh / scale, fw / scale), g)
        grad = torch.randn(n, c, out, out, generator=g)
        for label, backward in (("fwd", False), ("fwd+bwd", True)):
            ours_fn = step(roi_align, feature, rois, grad, out, scale, ratio, aligned, backward)
            tv_fn = step(torchvision.ops.roi_align, feature, rois, grad, out, scale, ratio, aligned, backward)
            a, b = alternate(ours_fn, tv_fn, args.repeats)
            print(f"{name:42s} {label:8s} {a * 1e3:9.1f} {b * 1e3:9.1f} {a / b:7.2f}x")


if __name__ == "__main__":
    main()
