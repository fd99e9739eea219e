"""Side by side with torchvision on this machine: same weights, inputs and thread count, the two
implementations alternating; medians and ratios (ours / torchvision) in one table.

    python benchmarks/compare_torchvision.py [--threads 2] [--repeats 3] [--sizes 800x1333 600x1000]
                                             [--only inference fresh]

All rows take about 20 minutes on two cores; ``--only`` runs some of them, e.g. the inference
rows at other sizes: ``--only inference --sizes 427x640 100x2000``.

Where the CPU has bf16 instructions, extra rows time the opt-in bf16 mode: ours in bf16 against
torchvision in float32 (its default), and both under bf16 autocast.

Under each float32 training and inference row, a "floor" line gives the time that the
convolutions and matrix products of torchvision's model (counted by PyTorch's FLOP counter) take
at the higher of two float32 rates measured on this machine right after the row (a large matrix
product and a large convolution), as a ratio of torchvision's time in that row: about the lowest
time an implementation doing the same products can reach. Fewer products (Winograd's
convolutions, in our inference path) go below it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, str(Path(__file__).parent))
from bench_roi_align import make_rois  # noqa: E402
from common import alternate, parser, pin_pooler_scales  # noqa: E402

from maskrcnn.config import SolverConfig, replace_nested, small_cpu_model  # noqa: E402
from maskrcnn.engine.optimizer import build_optimizer, dense_layout  # noqa: E402
from maskrcnn.engine.trainer import cpu_training_kernels  # noqa: E402
from maskrcnn.interop.torchvision import from_torchvision  # noqa: E402
from maskrcnn.modeling.mask_rcnn import build_model  # noqa: E402
from maskrcnn.modeling.transform import resize_scale  # noqa: E402
from maskrcnn.ops import paste_masks, roi_align  # noqa: E402
from maskrcnn.precision import bf16_autocast, cpu_has_bf16  # noqa: E402
from maskrcnn.weights import save_weights  # noqa: E402

BF16 = cpu_has_bf16()
SECTIONS = ["roi_align", "paste", "train", "inference", "fresh"]


def row(name: str, a: float, b: float, unit: str = "s") -> None:
    scale = 1e3 if unit == "ms" else 1.0
    print(f"{name:58s} {a * scale:10.3f} {b * scale:10.3f} {a / b:7.2f}x   ({unit})")


def product_rates() -> dict[str, float]:
    """GFLOP/s that float32 products reach on this machine now (median of 10): a 2048^3 matrix
    product and a 3x3, 256-channel convolution on a channels-last 100x168 map."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.randn(1, 256, 100, 168).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    work = {"torch.mm": (lambda: torch.mm(a, b), 2 * 2048**3),
            "3x3 conv": (lambda: torch.nn.functional.conv2d(x, w, padding=1),
                         2 * 100 * 168 * 256 * 256 * 9)}
    rates = {}
    with torch.inference_mode():
        for name, (fn, flop) in work.items():
            fn()
            seconds = []
            for _ in range(10):
                t0 = time.perf_counter()
                fn()
                seconds.append(time.perf_counter() - t0)
            rates[name] = flop / statistics.median(seconds) / 1e9
    return rates


def floor_line(tv_fn, tv_seconds: float) -> None:
    """Print the time that the convolutions and matrix products of ``tv_fn()`` (forward and
    backward) take at the higher of ``product_rates()``, as a ratio of ``tv_seconds``."""
    with FlopCounterMode(display=False) as counter:
        tv_fn()
    gflop = counter.get_total_flops() / 1e9
    rate = max(product_rates().values())
    seconds = gflop / rate
    print(f"  float32 floor: torchvision's {gflop:.1f} GFLOP of products at {rate:.0f} GFLOP/s "
          f"take {seconds:.3f} s, {seconds / tv_seconds:.2f}x of its time")


def tv_r50(seed: int = 0):
    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    with torch.no_grad():  # random weights would give no detections above 0.05
        model.roi_heads.box_predictor.cls_score.weight.mul_(40)
    pin_pooler_scales(model)
    return model.eval()


def detections_line(ours: dict, tv: dict) -> None:
    """How many of torchvision's detections ours also makes: the same label and a box within
    0.5 px (the float rounding of the fast path moves boxes by far less), and how many of
    torchvision's share its lowest kept score. The random weights here make many candidates
    score exactly 1.0; among tied candidates, the order that float rounding gives the proposals
    decides which are kept, so then fewer can be the same while the work is the same."""
    gap = (ours["boxes"][:, None] - tv["boxes"][None]).abs().amax(-1)
    same = (gap <= 0.5) & (ours["labels"][:, None] == tv["labels"][None])
    scores = tv["scores"]
    ties = ""
    if len(scores):
        lowest = scores.min()
        ties = f"; {int((scores == lowest).sum())} of torchvision's tie at its lowest kept score, {lowest:.6f}"
    print(f"  detections: ours {len(ours['boxes'])}, torchvision {len(tv['boxes'])}, of which "
          f"{int(same.any(0).sum())} the same (label, box within 0.5 px){ties}")


def in_bf16(fn):
    def run():
        with bf16_autocast("cpu", True):
            return fn()
    return run


def inference(repeats: int, sizes: list[tuple[int, int]]) -> None:
    tv = tv_r50()
    ours = from_torchvision(tv.state_dict(), verbose=False).optimize_for_inference()
    for h, w in sizes:
        image = torch.rand(3, h, w)
        ours_fn, tv_fn = (lambda: ours([image])), (lambda: tv([image]))
        with torch.inference_mode():
            a, b = alternate(ours_fn, tv_fn, repeats)
            row(f"inference R50-FPN, {h}x{w} (HxW) image", a, b)
            detections_line(ours_fn()[0], tv_fn()[0])
            floor_line(tv_fn, b)
            if BF16:
                ours.use_bf16(True)
                a, b = alternate(ours_fn, tv_fn, repeats)
                row("  ours in bf16 (opt-in), torchvision in float32", a, b)
                a, b = alternate(ours_fn, in_bf16(tv_fn), repeats)
                row("  both in bf16", a, b)
                ours.use_bf16(False)


def small_tv_model(cfg):
    """torchvision's Mask R-CNN assembled with the settings of ``cfg`` (a ResNet-18-FPN config)."""
    body = torchvision.models.resnet18(weights=None, norm_layer=torch.nn.BatchNorm2d)
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               [64, 128, 256, 512], cfg.backbone.fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.rpn.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    c, h = cfg.backbone.fpn_channels, cfg.roi_heads
    return MaskRCNN(
        backbone, num_classes=None, min_size=cfg.input.min_size_train, max_size=cfg.input.max_size,
        rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=cfg.rpn.pre_nms_topk_train,
        rpn_post_nms_top_n_train=cfg.rpn.post_nms_topk_train,
        rpn_batch_size_per_image=cfg.rpn.batch_size_per_image,
        box_batch_size_per_image=h.batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, h.pooler_sampling_ratio),
        box_head=TwoMLPHead(c * 49, h.box_fc_dim), box_predictor=FastRCNNPredictor(h.box_fc_dim, 4),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, h.pooler_sampling_ratio),
        mask_head=MaskRCNNHeads(c, list(h.mask_conv_dims), 1),
        mask_predictor=MaskRCNNPredictor(h.mask_conv_dims[-1], h.mask_conv_dims[-1], 4))


def train_step(repeats: int, name: str, bf16: bool = False, **changes) -> None:
    # the same conventions as torchvision's: legacy RoIAlign with 2x2 samples, soft mask targets
    cfg = replace_nested(small_cpu_model(3), **{"roi_heads.pooler_sampling_ratio": 2,
                                               "roi_heads.pooler_aligned": False,
                                               "roi_heads.mask_target": "roi_align_soft",
                                               "rpn.anchor_round": True, **changes})
    torch.manual_seed(0)
    tv = small_tv_model(cfg).train()
    ours = cpu_training_kernels(build_model(cfg)).train()  # as our trainer does on the CPU
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 240 + 16 * i, 320, generator=g) for i in range(4)]
    targets = []
    for img in images:
        _, hh, ww = img.shape
        xy = torch.rand(4, 2, generator=g) * torch.tensor([ww * 0.6, hh * 0.6])
        boxes = torch.cat([xy, xy + 20 + torch.rand(4, 2, generator=g) * 80], 1)
        masks = torch.zeros(4, hh, ww, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 4, (4,), generator=g), "masks": masks})
    # The same SGD update, each as its library's training loop builds it: our trainer's
    # optimizer (the fused kernel) and the plain one of torchvision's reference train.py.
    opts = [build_optimizer(SolverConfig(base_lr=1e-4, momentum=0.9), [{"params": list(ours.parameters())}]),
            torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)]

    def step(model, opt):
        def run():
            losses = model(images, [dict(t) for t in targets])
            opt.zero_grad()
            sum(losses.values()).backward()
            with dense_layout(opt):  # as our trainer steps; nothing to do for torchvision's layout
                opt.step()
        return run

    a, b = alternate(step(ours, opts[0]), step(tv, opts[1]), repeats)
    row(f"train step, {name}, 4 images", a, b)
    floor_line(step(tv, opts[1]), b)
    if bf16 and BF16:
        ours.use_bf16(True)
        a, b = alternate(step(ours, opts[0]), step(tv, opts[1]), repeats)
        row("  ours in bf16 (opt-in), torchvision in float32", a, b)
        a, b = alternate(step(ours, opts[0]), in_bf16(step(tv, opts[1])), repeats)
        row("  both in bf16", a, b)


def roi_align_rows(repeats: int, device: torch.device = torch.device("cpu")) -> None:
    g = torch.Generator().manual_seed(0)
    for n, size in ((512, 7), (128, 14)):
        feature = torch.randn(1, 256, 200, 272, generator=g).to(device).requires_grad_()
        rois = make_rois(n, (800, 1088), g).to(device)
        grad = torch.randn(n, 256, size, size, generator=g).to(device)

        def fb(op):
            def run():
                op(feature, rois, size, 0.25, 2, False).backward(grad)
                feature.grad = None
            return run

        a, b = alternate(fb(roi_align), fb(torchvision.ops.roi_align), max(repeats, 5))
        row(f"RoIAlign fwd+bwd, {n} RoIs x 256 ch, {size}x{size}", a, b, "ms")


def paste_rows(repeats: int, device: torch.device = torch.device("cpu")) -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(100, 28, 28, generator=g).to(device)
    # the same boxes, inside even the smaller image, for both sizes
    xy = torch.rand(100, 2, generator=g) * torch.tensor([1200.0, 700.0])
    boxes = torch.cat([xy, xy + 40 + torch.rand(100, 2, generator=g) * 250], 1).to(device)
    for hw in ((1000, 1500), (2000, 3000)):
        a, b = alternate(lambda: paste_masks(masks, boxes, hw, mode="torchvision"),
                         lambda: paste_masks_in_image(masks[:, None], boxes, hw) > 0.5, repeats)
        row(f"paste 100 masks into a {hw[1]}x{hw[0]} image", a, b, "ms")


def fresh_process(repeats: int, sizes: list[tuple[int, int]]) -> None:
    """For each size, the first inference of a freshly loaded model, each implementation in its
    own fresh process, alternating (median of up to 3): its time, which includes the one-off work
    of a first call (our Winograd filters, oneDNN's kernels for new shapes), its peak resident
    memory (VmHWM, weights included), and the whole script's time from its first line: importing
    the library, loading the weights and the first inference, as a command that segments one
    image takes. Each process loads the same weights as its users do: torchvision builds its
    model and loads the state-dict file, ours loads that state dict converted to our weight file
    (``maskrcnn.load``). Each imports only its own library (importing torchvision alone adds
    about 170 MB; the library never does). Before the inference each returns the memory that
    loading freed to the system (glibc's ``malloc_trim``), so that the memory the inference adds
    does not depend on how much of it the allocator happened to keep."""
    build = {"ours": "import maskrcnn\n"
                     "m = maskrcnn.load({ours!r}, device='cpu').model",
             "tv": "from torchvision.models.detection import maskrcnn_resnet50_fpn\n"
                   "m = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)\n"
                   "m.load_state_dict(torch.load({tv!r}, weights_only=True)); m.eval()\n"
                   f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                   "from common import pin_pooler_scales; pin_pooler_scales(m)"}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"tv": str(Path(tmp) / "r50.pt"), "ours": str(Path(tmp) / "r50.safetensors")}
        state = tv_r50().state_dict()
        torch.save(state, files["tv"])
        save_weights(files["ours"], from_torchvision(state, verbose=False))
        for h, w in sizes:
            results = {which: [] for which in build}
            for _ in range(min(repeats, 3)):
                for which, make in build.items():
                    code = ("import time; start = time.perf_counter()\n"
                            "import gc, torch\n"
                            f"torch.set_num_threads({torch.get_num_threads()})\n"
                            f"{make.format(**files)}\n"
                            f"gc.collect(); x = torch.rand(3, {h}, {w})\n"
                            "kb = lambda key: [l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]\n"
                            # memory freed by loading goes back to the system (glibc keeps it
                            # otherwise, for the inference to reuse), then the high-water mark is
                            # reset so that it covers the inference (weights included)
                            "import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0)\n"
                            "open('/proc/self/clear_refs', 'w').write('5'); before = kb('VmRSS')\n"
                            "t0 = time.perf_counter()\n"
                            "with torch.inference_mode(): m([x])\n"
                            "end = time.perf_counter()\n"
                            "print(end - t0, kb('VmHWM'), before, end - start)")
                    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                    seconds, peak, before, whole = out.stdout.split()[-4:]
                    results[which].append((float(seconds), int(peak) / 1024, (int(peak) - int(before)) / 1024,
                                           float(whole)))
            (a_s, a_peak, a_add, a_whole), (b_s, b_peak, b_add, b_whole) = (
                [statistics.median(v) for v in zip(*results[k])] for k in build)
            row(f"first inference of a fresh process, {h}x{w} image", a_s, b_s)
            row("  peak memory (VmHWM) of that process", a_peak, b_peak, "MiB")
            row("  of which added by the inference (peak - RSS before it)", a_add, b_add, "MiB")
            row("  whole script: import, load the weights, first inference", a_whole, b_whole)


def cpu_name() -> str:
    """The CPU's model name, and whether it has AMX tiles (bf16 matrix units)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")
    return name + (" with AMX" if "amx_bf16" in info else "")


def image_size(text: str) -> tuple[int, int]:
    """An ``HxW`` argument that both implementations can run: torchvision stops on an image
    whose resized short side floors to 0 pixels, such as 2x3000."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW, e.g. 800x1333") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text}: both sides must be at least 1 pixel")
    scale = resize_scale((h, w), 800, 1333)
    if int(h * scale) == 0 or int(w * scale) == 0:
        raise argparse.ArgumentTypeError(
            f"{text}: torchvision resizes it to less than 1 pixel on a side and stops (ours keeps 1 "
            f"pixel); use a long side below {1333 * min(h, w)} pixels")
    return h, w


def main() -> None:
    cli = parser(__doc__, repeats=3)
    cli.add_argument("--sizes", nargs="+", type=image_size, default=[(800, 1333)], metavar="HxW",
                     help="input sizes of the inference and fresh-process rows (both models resize to 800 / 1333)")
    cli.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS, metavar="ROWS",
                     help=f"run only these groups of rows, of {', '.join(SECTIONS)} (default: all)")
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{args.threads} threads, median of {args.repeats} alternating runs, "
          f"CPU bf16 instructions: {'yes' if BF16 else 'no'}")
    print(f"{'measurement':58s} {'ours':>10s} {'torchvision':>10s} {'ratio':>8s}")
    if "roi_align" in args.only:
        roi_align_rows(args.repeats)
    if "paste" in args.only:
        paste_rows(args.repeats)
    if "train" in args.only:
        train_step(args.repeats, "small CPU preset settings", bf16=True)
        # torchvision's defaults on the same ResNet-18: 256-channel FPN, 512 RoIs per image, the
        # 1024-wide box head and the four-conv mask head
        train_step(args.repeats, "R18-FPN with torchvision's head defaults", bf16=True,
                   **{"backbone.fpn_channels": 256, "roi_heads.batch_size_per_image": 512,
                      "roi_heads.box_fc_dim": 1024, "roi_heads.mask_conv_dims": (256, 256, 256, 256),
                      "rpn.batch_size_per_image": 256, "rpn.pre_nms_topk_train": 2000,
                      "rpn.post_nms_topk_train": 2000})
    if "inference" in args.only:
        inference(args.repeats, args.sizes)
    if "fresh" in args.only:
        fresh_process(args.repeats, args.sizes)


if __name__ == "__main__":
    main()
