"""Opt-in bfloat16 on the CPU.

Under ``torch.autocast(dtype=torch.bfloat16)`` the convolutions and matrix products run in
bfloat16, which CPUs with bf16 dot-product instructions (AVX512-BF16, AMX) execute about twice as
fast as float32. Everything whose precision decides the outputs stays float32: RoIAlign's sums,
the heads' logits and deltas (cast back at each head's output), the losses, box decoding, NMS and
mask pasting. The numbers change slightly, so the mode is never on by default.
"""

from __future__ import annotations

import contextlib

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic; without it bf16 is emulated and slower."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_bf16(device: torch.device | str) -> None:
    """Raise a ValueError saying how to fix it when bf16 would not pay off on ``device``."""
    device = torch.device(device)
    if device.type == "cpu" and not cpu_has_bf16():
        raise ValueError("bf16 needs a CPU with bfloat16 instructions (AVX512-BF16 or AMX) and this "
                         "one has none, so it would run slower than float32; run without bf16")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support; run without bf16 (AMP uses float16)")


def bf16_autocast(device_type: str, enabled: bool):
    """The autocast context of the bf16 mode; when not ``enabled``, nothing, so that an outer
    autocast (AMP on CUDA) still applies."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
