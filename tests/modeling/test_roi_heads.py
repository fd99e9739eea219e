import pytest
import torch

from maskrcnn.config import small_cpu_model
from maskrcnn.modeling import roi_heads
from maskrcnn.modeling.mask_rcnn import build_model
from maskrcnn.ops.roi_align import as_rois


@pytest.mark.parametrize("counts", [(9, 14), (0, 0)])
def test_predicting_pools_the_box_rois_in_chunks_with_the_same_features(monkeypatch, counts):
    """When predicting, the box head takes the RoIs a chunk at a time (7 here): the pooler sees
    each chunk, and the features are those of pooling every RoI at once, as with autograd."""
    monkeypatch.setattr(roi_heads, "_ROIS_PER_CHUNK", 7)
    torch.manual_seed(0)
    model = build_model(small_cpu_model(3)).eval()
    heads = model.roi_heads
    features = [torch.randn(2, 64, 64 // 2 ** i, 96 // 2 ** i) for i in range(4)]
    boxes = []
    for n in counts:
        xy = torch.rand(n, 2) * 200
        boxes.append(torch.cat([xy, xy + 8 + torch.rand(n, 2) * 150], 1))
    pooled = []
    real_pooler = heads.box_pooler.forward
    monkeypatch.setattr(heads.box_pooler, "forward",
                        lambda f, b: pooled.append(len(as_rois(b, f[0]))) or real_pooler(f, b))
    with torch.no_grad():
        got = heads._box_head_features(features, boxes)
        assert pooled == ([7, 7, 7, 2] if sum(counts) else [0])
        expected = heads.box_head(real_pooler(features, boxes))
    assert got.shape == (sum(counts), heads.box_head.out_features)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():
        pooled.clear()
        got = heads._box_head_features(features, boxes)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert pooled == [sum(counts)]
