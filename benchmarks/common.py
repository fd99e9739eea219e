"""What the benchmark scripts share: the command line and the alternating timer."""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """A command line with ``--threads`` (default 2, this machine's cores) and ``--repeats``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=repeats)
    return p


def finish() -> None:
    """Wait for the GPU's queued work, once a timed function has used CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def alternate(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of ``ours()`` and ``theirs()`` after a warm-up of each, run in turn so
    that both see the same machine state. Each time includes the GPU work it queued."""
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        for fn, store in ((ours, a), (theirs, b)):
            finish()
            t0 = time.perf_counter()
            fn()
            finish()
            store.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def pin_pooler_scales(model) -> None:
    """Set the pooler scales of a torchvision Mask R-CNN to the FPN's strides, 1/4 to 1/32, as
    any first image of ordinary height sets them. torchvision takes them from its first image
    and keeps them, wrongly for some wide ones such as 100x2000 (README, Load torchvision
    weights); with these, both implementations compute the same detections at every size."""
    from torchvision.ops.poolers import initLevelMapper  # only the scripts that time torchvision call this

    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        pool.scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        pool.map_levels = initLevelMapper(2, 5, canonical_scale=224, canonical_level=4)
