import torch
from torch import nn

from maskrcnn.ops.weight_cache import WeightCache


def test_made_once_and_again_only_when_the_parameter_or_arguments_change():
    calls = []

    def make(w, scale):
        calls.append(scale)
        return w * scale

    cache = WeightCache(make)
    p = nn.Parameter(torch.ones(3))
    first = cache(p, 2)
    assert cache(p, 2) is first and len(calls) == 1
    assert not first.requires_grad  # made from the detached parameter
    with torch.no_grad():
        p.mul_(3)  # in place, as load_state_dict writes
    torch.testing.assert_close(cache(p, 2), torch.full((3,), 6.0))
    torch.testing.assert_close(cache(p, 1), torch.full((3,), 3.0))
    torch.testing.assert_close(cache(p.double(), 1), torch.full((3,), 3.0, dtype=torch.float64))
    assert calls == [2, 2, 1, 1]
