import torch

from maskrcnn.modeling.poolers import MultiLevelRoIAlign, assign_levels
from maskrcnn.ops import roi_align
from maskrcnn.ops.roi_align import roi_align_pyramid


def test_level_rule_boundaries():
    sides = torch.tensor([50.0, 111.9, 112.0, 223.9, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert assign_levels(boxes, 2, 5).tolist() == [2, 2, 3, 3, 4, 4, 5, 5]


def test_multilevel_output_keeps_the_maps_memory_format_and_box_order():
    """Each box pools from its own level, in the order of the boxes, whatever the layout."""
    g = torch.Generator().manual_seed(0)
    pooler = MultiLevelRoIAlign(output_size=2, strides=(4, 8), sampling_ratio=2, aligned=True)
    maps = [torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 3, 8, 8, generator=g)]
    boxes = [torch.tensor([[0.0, 0.0, 300.0, 300.0], [4.0, 4.0, 20.0, 20.0], [8.0, 2.0, 30.0, 40.0]])]
    expected = torch.cat([roi_align(maps[level], torch.cat([torch.zeros(1, 1), b[None]], 1), 2,
                                    1 / stride, 2, True)
                          for b, (level, stride) in zip(boxes[0], [(1, 8), (0, 4), (0, 4)])])
    for layout in (torch.contiguous_format, torch.channels_last):
        out = pooler([m.contiguous(memory_format=layout) for m in maps], boxes)
        assert out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out, expected)


def test_a_pyramid_in_one_buffer_pools_in_one_product(monkeypatch):
    """Maps that are views of one buffer, level after level (FPN's when predicting), take the
    one-product path and give what the same maps apart give."""
    import maskrcnn.modeling.poolers as poolers

    g = torch.Generator().manual_seed(0)
    pooler = MultiLevelRoIAlign(output_size=3, strides=(4, 8, 16), sampling_ratio=0, aligned=False)
    shapes = [(16, 20), (8, 10), (4, 5)]
    buffer = torch.randn(2 * sum(h * w for h, w in shapes), 6, generator=g)
    maps = [part.view(2, h, w, 6).permute(0, 3, 1, 2)
            for part, (h, w) in zip(buffer.split([2 * h * w for h, w in shapes]), shapes)]
    xy = torch.rand(2, 12, 2, generator=g) * 60
    boxes = [torch.cat([p, p + torch.rand(12, 2, generator=g) * 300], 1) for p in xy]
    calls = []
    monkeypatch.setattr(poolers, "roi_align_pyramid",
                        lambda *a, **k: calls.append(1) or roi_align_pyramid(*a, **k))
    got = pooler(maps, boxes)
    assert calls == [1]
    expected = pooler([m.clone() for m in maps], boxes)
    assert calls == [1]
    assert len(set(assign_levels(torch.cat(boxes), 2, 4).tolist())) == 3
    assert torch.equal(got, expected)
