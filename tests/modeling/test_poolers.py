import importlib

import pytest
import torch

from maskrcnn.modeling import poolers
from maskrcnn.modeling.poolers import MultiLevelRoIAlign, assign_levels
from maskrcnn.ops import roi_align
from maskrcnn.ops.roi_align import roi_align_pyramid

roi_align_module = importlib.import_module("maskrcnn.ops.roi_align")  # the package re-exports the name


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


def pyramid_case(g, shapes, channels=6, images=2, boxes_per_image=12):
    """A three-level pooler, maps of ``shapes`` as views of one channels-last buffer, level
    after level, and boxes of every level."""
    pooler = MultiLevelRoIAlign(output_size=3, strides=(4, 8, 16), sampling_ratio=0, aligned=False)
    buffer = torch.randn(images * sum(h * w for h, w in shapes), channels, generator=g,
                         dtype=torch.float64)
    maps = [part.view(images, h, w, channels).permute(0, 3, 1, 2)
            for part, (h, w) in zip(buffer.split([images * h * w for h, w in shapes]), shapes)]
    xy = torch.rand(images, boxes_per_image, 2, generator=g, dtype=torch.float64) * 60
    boxes = [torch.cat([p, p + torch.rand(boxes_per_image, 2, generator=g, dtype=torch.float64) * 300], 1)
             for p in xy]
    assert len(set(assign_levels(torch.cat(boxes), 2, 4).tolist())) == 3
    return pooler, buffer, maps, boxes


def level_by_level(maps, boxes, strides=(4, 8, 16)):
    """What ``roi_align`` gives each box on its own level (output 3, adaptive sampling, legacy)."""
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
    levels = assign_levels(rois[:, 1:], 2, 4) - 2
    return torch.cat([roi_align(maps[level], roi[None], 3, 1 / strides[level], 0, False)
                      for roi, level in zip(rois, levels.tolist())])


def test_a_pyramid_in_one_buffer_pools_from_it_without_a_copy(monkeypatch):
    """Maps that are views of one buffer, level after level (FPN's when predicting), are pooled
    from that buffer itself; separate maps, when predicting, level by level."""
    pooler, buffer, maps, boxes = pyramid_case(torch.Generator().manual_seed(0), [(16, 20), (8, 10), (4, 5)])
    tables = []
    monkeypatch.setattr(poolers, "roi_align_pyramid",
                        lambda *a, **k: tables.append(a[0]) or roi_align_pyramid(*a, **k))
    got = pooler(maps, boxes)
    assert len(tables) == 1 and tables[0].data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(got, level_by_level(maps, boxes), rtol=1e-12, atol=1e-12)
    apart = pooler([m.clone() for m in maps], boxes)
    assert len(tables) == 1
    assert torch.equal(apart, got)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("chunk_entries", [None, 200])
def test_gradients_reach_each_level_as_from_the_boxes_pooled_apart(monkeypatch, layout, chunk_entries):
    """Separate maps, copied into one table of rows when training: the same values, and the
    same gradients for every map, as each box pooled from its own level alone, also when the
    boxes are pooled a few at a time; a level without boxes gets a zero gradient."""
    if chunk_entries:
        monkeypatch.setattr(roi_align_module, "_CHUNK_ENTRIES", chunk_entries)
    g = torch.Generator().manual_seed(0)
    _, _, maps, boxes = pyramid_case(g, [(16, 20), (8, 10), (4, 5)])
    # a fourth level, P5, where no box pools: they are at most 360 pixels wide (levels 2 to 4)
    pooler = MultiLevelRoIAlign(output_size=3, strides=(4, 8, 16, 32), sampling_ratio=0, aligned=False)
    maps.append(torch.randn(2, 6, 2, 3, generator=g, dtype=torch.float64))
    maps = [m.contiguous(memory_format=layout).requires_grad_() for m in maps]
    grad_out = torch.randn(24, 6, 3, 3, generator=g, dtype=torch.float64)
    tables = []
    monkeypatch.setattr(poolers, "roi_align_pyramid",
                        lambda *a, **k: tables.append(a[0]) or roi_align_pyramid(*a, **k))
    got = pooler(maps, boxes)
    assert len(tables) == 1
    got_grads = torch.autograd.grad(got, maps, grad_out)
    expected = level_by_level(maps[:3], boxes)
    expected_grads = torch.autograd.grad(expected, maps[:3], grad_out)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not got_grads[3].any()
