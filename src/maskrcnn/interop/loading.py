"""Loading state dicts that only partly fit a model, with a report of what did not."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoadReport:
    """Keys the model wanted but did not get, keys it did not know, and keys whose shapes differ."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing (kept their initial values): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected (ignored): {', '.join(self.unexpected)}")
        for key, theirs, ours in self.mismatched:
            lines.append(f"shape mismatch (kept initial values): {key} file {theirs} vs model {ours}")
        return "\n".join(lines)


def load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor],
                  ignore_missing: tuple[str, ...] = ()) -> LoadReport:
    """Copy every tensor whose key and shape match; report the rest instead of failing.

    Keys starting with a prefix in ``ignore_missing`` are not reported as missing.
    """
    own = model.state_dict()
    report = LoadReport()
    matched = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            matched[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state_dict and not k.startswith(ignore_missing)
                      and not k.endswith("num_batches_tracked")]
    model.load_state_dict(matched, strict=False)
    return report
