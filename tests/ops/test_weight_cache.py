import torch
from torch import nn

from maskrcnn.ops.weight_cache import WeightCache, clear_weight_caches


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


def test_optimizer_steps_are_seen_and_writes_through_data_are_cleared_by_hand():
    class Scaled(nn.Module):  # a layer that runs on a cached copy of its weight
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))
            self._doubled = WeightCache(lambda w: w * 2)

        def forward(self):
            return self._doubled(self.weight)

    model = nn.Sequential(nn.Sequential(Scaled()))
    layer = model[0][0]
    torch.testing.assert_close(layer(), torch.full((3,), 2.0))
    layer.weight.grad = torch.ones(3)
    torch.optim.SGD(model.parameters(), lr=0.5).step()  # weight 0.5: version counter bumped
    torch.testing.assert_close(layer(), torch.full((3,), 1.0))
    layer.weight.data.fill_(4.0)  # .data has its own version counter: the cache cannot tell
    clear_weight_caches(model)
    torch.testing.assert_close(layer(), torch.full((3,), 8.0))


def test_copies_and_pickles_start_empty_and_make_the_value_again():
    """A model copied or saved after predicting carries no cached value, which may be a tensor
    that can be neither copied nor saved (oneDNN's packed weights): here a value whose copying
    fails. The copy makes its own on first use."""
    import copy
    import pickle

    cache = WeightCache(_uncopyable)
    p = nn.Parameter(torch.ones(2))
    assert isinstance(cache(p), Uncopyable)
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert clone._value is None and isinstance(clone(p), Uncopyable)
    assert isinstance(cache._value, Uncopyable)  # the original keeps its value


class Uncopyable:
    """A value that refuses to be copied or pickled."""

    def __deepcopy__(self, memo):
        raise NotImplementedError

    def __reduce__(self):
        raise NotImplementedError


def _uncopyable(weight):
    return Uncopyable()
