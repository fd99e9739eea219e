import torch

from maskrcnn.modeling.poolers import MultiLevelRoIAlign, assign_levels
from maskrcnn.ops import roi_align


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
