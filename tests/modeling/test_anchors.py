import torch

from maskrcnn.modeling.anchors import AnchorGenerator, cell_anchors, grid_anchors


def test_cell_anchors_keep_area_and_ratio():
    cells = cell_anchors((32,), (0.5, 1.0, 2.0))
    w = cells[:, 2] - cells[:, 0]
    h = cells[:, 3] - cells[:, 1]
    torch.testing.assert_close(w * h, torch.full((3,), 1024.0))
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0]))
    # torchvision's rounding of half-extents (SPEC §1.4): s = 32, a = 0.5 -> (-23, -11, 23, 11)
    assert cell_anchors((32,), (0.5,), rounded=True).tolist() == [[-23.0, -11.0, 23.0, 11.0]]


def test_grid_order_is_row_major_with_anchors_contiguous():
    cells = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [-2.0, -2.0, 2.0, 2.0]])
    anchors = grid_anchors(cells, (2, 3), (8, 4))
    assert anchors.shape == (12, 4)
    # cell (row 1, col 2) -> centre (x = 2 * 4, y = 1 * 8); its second anchor is index (1*3+2)*2+1
    assert anchors[11].tolist() == [6.0, 6.0, 10.0, 10.0]


def test_generator_stride_is_padded_size_over_feature_size():
    gen = AnchorGenerator([(32,), (64,)], (1.0,))
    levels = gen((64, 96), [(16, 24), (8, 12)], torch.device("cpu"))
    assert [lvl.shape[0] for lvl in levels] == [16 * 24, 8 * 12]
    assert levels[1][1].tolist() == [8 - 32, -32, 8 + 32, 32]


def test_nominal_strides_differ_from_the_ratio_where_a_map_was_rounded_up():
    """An 800x1216 input: P6 (the last of five levels) is 13x19 cells. torchvision places its
    anchors 800 // 13 = 61 and 1216 // 19 = 64 pixels apart; Detectron2 64 and 64."""
    sizes = [(32,), (64,), (128,), (256,), (512,)]
    maps = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    ratio = AnchorGenerator(sizes, (1.0,))((800, 1216), maps, torch.device("cpu"))
    nominal = AnchorGenerator(sizes, (1.0,), strides=(4, 8, 16, 32, 64))((800, 1216), maps, torch.device("cpu"))
    for level in range(4):
        assert torch.equal(ratio[level], nominal[level])
    row = 19  # the first anchor of the second row of cells
    assert ratio[4][row].tolist() == [-256.0, 61 - 256, 256, 61 + 256]
    assert nominal[4][row].tolist() == [-256.0, 64 - 256, 256, 64 + 256]
    assert nominal[4][-1].tolist() == [18 * 64 - 256, 12 * 64 - 256, 18 * 64 + 256, 12 * 64 + 256]


def test_the_paper_preset_places_anchors_at_nominal_strides_and_torchvisions_at_the_ratio():
    from maskrcnn.config import paper_model, torchvision_model
    from maskrcnn.modeling.mask_rcnn import build_model

    assert build_model(paper_model(3), random_init=False).rpn.anchors.strides == (4, 8, 16, 32, 64)
    assert build_model(torchvision_model(), random_init=False).rpn.anchors.strides is None
