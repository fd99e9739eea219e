"""Side by side with torchvision on a CUDA GPU: the same weights and inputs, the two
implementations alternating; medians and ratios (ours / torchvision) in one table, with the peak
GPU memory that each allocates on top of its weights.

    python benchmarks/compare_torchvision_cuda.py [--repeats 20] [--sizes 800x1333 480x640]

Rows: RoIAlign forward + backward, mask pasting, R50-FPN inference (ours as ``maskrcnn.load``
prepares it, and without ``optimize_for_inference``) and an R50-FPN training step of two
images. Each model row runs in float32 with PyTorch's defaults (TF32 convolutions, float32
matrix products) and under float16 autocast (AMP; training with a gradient scaler). Each
inference row first says how many of torchvision's detections ours makes too, in float32 with
TF32 off and under AMP.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, finish  # noqa: E402
from compare_torchvision import detections_line, image_size, paste_rows, roi_align_rows, row, tv_r50  # noqa: E402

from maskrcnn.config import SolverConfig  # noqa: E402
from maskrcnn.engine.optimizer import build_optimizer, dense_layout  # noqa: E402
from maskrcnn.interop.torchvision import from_torchvision  # noqa: E402


def amp(fn, device: torch.device):
    def run():
        with torch.autocast(device.type, dtype=torch.float16):
            return fn()
    return run


@contextlib.contextmanager
def no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def memory_row(name: str, ours, theirs, device: torch.device) -> None:
    """Peak bytes allocated during one call of each, above what was allocated before it."""
    peaks = []
    for fn in (ours, theirs):
        finish()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        finish()
        peaks.append((torch.cuda.max_memory_allocated(device) - before) / 2**20)
    row(name, *peaks, "MiB")


def inference(device: torch.device, repeats: int, sizes: list[tuple[int, int]]) -> None:
    tv = tv_r50().to(device)
    ours = from_torchvision(tv.state_dict(), verbose=False).to(device).optimize_for_inference()
    plain = from_torchvision(tv.state_dict(), verbose=False).to(device).eval()
    for h, w in sizes:
        image = torch.rand(3, h, w).to(device)
        ours_fn, plain_fn, tv_fn = (lambda: ours([image])), (lambda: plain([image])), (lambda: tv([image]))
        with torch.inference_mode():
            with no_tf32():
                detections_line(ours_fn()[0], tv_fn()[0])
            a, b = alternate(ours_fn, tv_fn, repeats)
            row(f"inference R50-FPN, {h}x{w} image, float32", a, b)
            a, b = alternate(plain_fn, tv_fn, repeats)
            row("  ours without optimize_for_inference", a, b)
            memory_row("  peak memory added by one inference", ours_fn, tv_fn, device)
            detections_line(amp(ours_fn, device)()[0], amp(tv_fn, device)()[0])
            a, b = alternate(amp(ours_fn, device), amp(tv_fn, device), repeats)
            row("  both under float16 autocast (AMP)", a, b)
            memory_row("  peak memory added by one AMP inference", amp(ours_fn, device),
                       amp(tv_fn, device), device)


def training_batch(device: torch.device, n: int = 2, objects: int = 6):
    """``n`` 480x640 images (both models resize them to 800x1067) with rectangular objects."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, 480, 640, generator=g)
        xy = torch.rand(objects, 2, generator=g) * torch.tensor([640 * 0.7, 480 * 0.7])
        boxes = torch.cat([xy, xy + 24 + torch.rand(objects, 2, generator=g) * 120], 1)
        masks = torch.zeros(objects, 480, 640, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        labels = torch.randint(1, 91, (objects,), generator=g)
        images.append(image.to(device))
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images, targets


def train_steps(device: torch.device, repeats: int) -> None:
    """torchvision's model built without pretrained weights (trainable BatchNorm, every stage
    trained) and ours from its state dict, which takes the same settings; each stepped by the
    optimizer its training loop builds: ours by our trainer's, torchvision's by plain SGD."""
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).to(device).train()
    ours = from_torchvision(tv.state_dict(), verbose=False).to(device).train()
    images, targets = training_batch(device)
    opts = [build_optimizer(SolverConfig(base_lr=1e-4, momentum=0.9), [{"params": list(ours.parameters())}]),
            torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)]

    def step(model, opt, scaler=None):
        def run():
            with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
                losses = model(images, [dict(t) for t in targets])
            opt.zero_grad()
            loss = sum(losses.values())
            (scaler.scale(loss) if scaler else loss).backward()
            with dense_layout(opt):
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
        return run

    a, b = alternate(step(ours, opts[0]), step(tv, opts[1]), repeats)
    row("train step R50-FPN, 2 images at 800x1067, float32", a, b)
    memory_row("  peak memory added by one step", step(ours, opts[0]), step(tv, opts[1]), device)
    scalers = [torch.amp.GradScaler(device.type) for _ in range(2)]
    a, b = alternate(step(ours, opts[0], scalers[0]), step(tv, opts[1], scalers[1]), repeats)
    row("  both under float16 autocast with a gradient scaler (AMP)", a, b)
    memory_row("  peak memory added by one AMP step", step(ours, opts[0], scalers[0]),
               step(tv, opts[1], scalers[1]), device)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--repeats", type=int, default=20)
    cli.add_argument("--sizes", nargs="+", type=image_size, default=[(800, 1333), (480, 640)], metavar="HxW")
    args = cli.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; benchmarks/compare_torchvision.py compares on the CPU")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, median of {args.repeats} alternating runs")
    print(f"{'measurement':58s} {'ours':>10s} {'torchvision':>10s} {'ratio':>8s}")
    sections = [lambda: roi_align_rows(args.repeats, device), lambda: paste_rows(args.repeats, device),
                lambda: train_steps(device, args.repeats), lambda: inference(device, args.repeats, args.sizes)]
    for section in sections:
        try:
            section()
        except Exception:  # one failing group of rows still leaves the others' figures
            traceback.print_exc()


if __name__ == "__main__":
    main()
