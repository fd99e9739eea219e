"""3x3 convolutions at inference: Winograd F(4x4, 3x3) (``maskrcnn.ops.winograd``) against the
direct convolution PyTorch runs (oneDNN on the CPU), on the shapes of an R50-FPN inference.

    python benchmarks/bench_winograd.py [--threads 2] [--repeats 5]

Both run alternately on the same channels-last float32 input; the table shows wall-clock
medians, the ratio Winograd / direct and each one's largest error against a float64 reference,
relative to the output's largest magnitude.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import alternate, parser

from maskrcnn.ops.winograd import conv3x3, winograd_weights

SHAPES = [
    # (name, N, C_in = C_out, H, W)
    ("FPN / RPN conv on P2, 800x1344 input", 1, 256, 200, 336),
    ("FPN / RPN conv on P3", 1, 256, 100, 168),
    ("res4 3x3 conv", 1, 256, 50, 84),
    ("res5 3x3 conv", 1, 512, 25, 42),
    ("res3 3x3 conv", 1, 128, 100, 168),
    ("mask head conv, 100 RoIs", 100, 256, 14, 14),
    ("res2 3x3 conv (64 ch: not swapped)", 1, 64, 200, 336),
]


def main() -> None:
    args = parser(__doc__, repeats=5).parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"{'shape':42s} {'direct':>9s} {'winograd':>9s} {'ratio':>7s} {'err direct':>11s} {'err wino':>9s}")
    for name, n, c, h, w in SHAPES:
        x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5)).contiguous(memory_format=torch.channels_last)
        bias = torch.randn(c, generator=g)
        u = winograd_weights(weight)
        with torch.inference_mode():
            direct = F.conv2d(x, weight, bias, padding=1)
            wino = conv3x3(x, u, bias)
            ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
            scale = ref.abs().max()
            errs = [((y.double() - ref).abs().max() / scale).item() for y in (direct, wino)]
            del direct, wino, ref
            a, b = alternate(lambda: F.conv2d(x, weight, bias, padding=1), lambda: conv3x3(x, u, bias),
                             args.repeats)
        print(f"{name:42s} {a * 1e3:7.1f}ms {b * 1e3:7.1f}ms {b / a:6.2f}x {errs[0]:11.1e} {errs[1]:9.1e}")


if __name__ == "__main__":
    main()
