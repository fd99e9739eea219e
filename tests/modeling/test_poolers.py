import torch

from maskrcnn.modeling.poolers import assign_levels


def test_level_rule_boundaries():
    sides = torch.tensor([50.0, 111.9, 112.0, 223.9, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert assign_levels(boxes, 2, 5).tolist() == [2, 2, 3, 3, 4, 4, 5, 5]
