import numpy as np
import pytest
import torch

tv_ops = pytest.importorskip("torchvision.ops")

from maskrcnn.ops import batched_nms, nms  # noqa: E402
from maskrcnn.ops.nms import _float_threshold, _overlapping_pairs, _overlapping_pairs_dense  # noqa: E402


def random_set(n, seed, dtype=torch.float32, integer=True):
    g = torch.Generator().manual_seed(seed)
    if integer:  # integer corners make many IoUs exact fractions such as 1/2 and 1/3
        xy = torch.randint(0, 60, (n, 2), generator=g).to(dtype)
        wh = torch.randint(1, 30, (n, 2), generator=g).to(dtype)
    else:
        xy = torch.rand(n, 2, generator=g, dtype=dtype) * 600
        wh = torch.rand(n, 2, generator=g, dtype=dtype) * 150
    scores = (torch.randint(0, 20, (n,), generator=g) / 20).to(dtype)  # many ties
    return torch.cat([xy, xy + wh], 1), scores, torch.randint(0, 5, (n,), generator=g)


def edge_set(threshold):
    """Box j inside box i and ending where i ends has IoU = (x overlap) / (width of i), the
    bound that decides which pairs are examined: starts a few float32 steps either side of
    ``x1_i + (1 - t) w_i``, at several coordinate magnitudes and widths. Boxes and scores."""
    rows, scores = [], []
    for k, (base, width) in enumerate([(0.0, 10.0), (1000.0, 0.37), (12345.678, 1000.0), (3.0, 1e-3)]):
        edge = np.float32(base + (1 - threshold) * width)
        for step in range(-3, 4):
            start = edge
            for _ in range(abs(step)):
                start = np.nextafter(start, np.float32(np.inf if step > 0 else -np.inf))
            y = 100.0 * (7 * k + step + 3)  # each pair on its own rows: pairs do not interact
            rows += [[base, y, base + width, y + 5], [float(start), y, base + width, y + 5]]
            scores += [0.9, 0.8] if step % 2 else [0.8, 0.9]
    return torch.tensor(rows), torch.tensor(scores)


def crowd_set(n, seed):
    """n boxes within a few pixels of one another: every pair overlaps."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=g) * 6
    boxes = torch.cat([corner, corner + 100 + torch.rand(n, 2, generator=g) * 6], 1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, 2, (n,), generator=g)


def pair_codes(first, second, n):
    return np.sort(np.asarray(first, dtype=np.int64) * n + np.asarray(second, dtype=np.int64))


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (7, 2), (60, 3), (400, 4), (999, 5), (1001, 6),
                                    (1600, 7), (5000, 8)])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 1 / 3])
def test_same_kept_indices_as_torchvision(n, seed, threshold):
    # 999 and 1001 boxes (3996 and 4004 numbers) sit either side of batched_nms' switch
    boxes, scores, idxs = random_set(n, seed)
    assert torch.equal(nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))
    assert torch.equal(batched_nms(boxes, scores, idxs, threshold),
                       tv_ops.batched_nms(boxes, scores, idxs, threshold))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_valued_boxes_in_both_precisions(dtype):
    boxes, scores, idxs = random_set(3000, 9, dtype, integer=False)
    scores = torch.rand(3000, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for threshold in (0.5, 0.7):
        assert torch.equal(nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))
        assert torch.equal(batched_nms(boxes, scores, idxs, threshold),
                           tv_ops.batched_nms(boxes, scores, idxs, threshold))


def test_iou_exactly_at_threshold():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # IoU exactly 1/2
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]  # suppression needs IoU > threshold
    assert nms(boxes, scores, 0.49).tolist() == [0]
    # IoU 1/3 rounds up to 0.33333334 in float32, which is above the double 1/3: suppressed
    third = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0]])
    assert nms(third, scores, 1 / 3).tolist() == [0]
    assert nms(third.double(), scores.double(), 1 / 3).tolist() == [0, 1]
    for b in (boxes, third, third.double()):
        for threshold in (0.5, 0.49, 1 / 3, 0.7):
            assert torch.equal(nms(b, scores.to(b), threshold), tv_ops.nms(b, scores.to(b), threshold))


def test_equal_scores_keep_input_order():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert torch.equal(nms(boxes, scores, 0.5), tv_ops.nms(boxes, scores, 0.5))


def test_classes_do_not_suppress_each_other():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_boxes_are_offset_in_float32(dtype):
    # IoU 100/140 = 0.714 > 0.7: suppressed in class 50 as in class 0 (bf16 offsets round the
    # corners, float16 ones overflow to inf)
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 14]], dtype=dtype)
    scores = torch.tensor([0.9, 0.8])
    for c in (0, 50):
        assert batched_nms(boxes, scores, torch.tensor([c, c]), 0.7).tolist() == [0]
    boxes, scores, idxs = random_set(600, 12, dtype)
    idxs = idxs * 40  # offsets up to 160 * 90 = 14,400: beyond bf16's integers, near fp16's max
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5),
                       tv_ops.batched_nms(boxes.float(), scores.float(), idxs, 0.5))


def test_empty_input():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert empty.dtype == torch.int64 and empty.numel() == 0


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 1 / 3, 0.5, 0.7, 0.95])
def test_the_gpu_paths_brute_force_pairs_are_the_sweeps(threshold, grouped):
    """CUDA tensors take their overlapping pairs from every pair's IoU, block by block; here
    on the CPU, with blocks of a few rows: the same pairs as the sweep, so the same NMS."""
    empty = torch.tensor([[5.0, 5, 5, 9], [5, 5, 5, 9], [0, 0, 10, 10], [2, 2, 2, 2]])  # 0 / 0 IoUs
    sets = [random_set(1600, 7), random_set(3000, 9, torch.float64, integer=False),
            random_set(3000, 9, integer=False), (*edge_set(threshold), None), crowd_set(700, 12),
            (empty, None, torch.tensor([0, 0, 1, 1]))]
    for boxes, _, idxs in sets:
        idxs = idxs if idxs is not None else torch.arange(len(boxes)) % 2
        groups = idxs if grouped else None
        t = _float_threshold(threshold, boxes.dtype)
        sweep = _overlapping_pairs(boxes.numpy(), None if groups is None else groups.numpy(), t)
        dense = _overlapping_pairs_dense(boxes, groups, t, entries=20_000)
        assert (dense[0] < dense[1]).all()
        assert np.array_equal(pair_codes(*sweep, len(boxes)), pair_codes(*dense, len(boxes)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_give_the_cpu_result_on_the_device():
    # batched_nms switches from one NMS over offset boxes to one per category above 4,000
    # numbers on the CPU and 100,000 on CUDA, as torchvision does, so each regime on its own
    for n in (800, 1500, 26_000):
        boxes, scores, idxs = random_set(n, 10, integer=False)
        boxes[:, 0::2] += (torch.arange(n) % 100)[:, None] * 1000.0  # 100 clusters, apart
        keep = nms(boxes.cuda(), scores.cuda(), 0.5)
        assert keep.device.type == "cuda"
        assert torch.equal(keep.cpu(), nms(boxes, scores, 0.5))
        if n != 1500:
            assert torch.equal(batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu(),
                               batched_nms(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_pairs_at_the_edge_of_the_overlap_bound(threshold):
    boxes, scores = edge_set(threshold)
    assert torch.equal(nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))
    # the same pairs 200 times over in one category each: batched_nms' per-category path
    many = boxes.repeat(200, 1) + torch.arange(200.0).repeat_interleave(len(boxes))[:, None] * 5e4
    idxs = torch.arange(len(many)) % 3
    assert torch.equal(batched_nms(many, scores.repeat(200), idxs, threshold),
                       tv_ops.batched_nms(many, scores.repeat(200), idxs, threshold))


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.97])
def test_crowds_where_every_box_overlaps_every_other(threshold):
    # more than a million pairs, examined in several runs, and long chains of boxes whose
    # fate depends on the boxes before them
    boxes, scores, idxs = crowd_set(1500, 11)
    assert torch.equal(nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))
    assert torch.equal(batched_nms(boxes, scores, idxs, threshold),
                       tv_ops.batched_nms(boxes, scores, idxs, threshold))


def test_negative_thresholds_are_refused():
    with pytest.raises(ValueError, match="iou_threshold must be >= 0"):
        nms(torch.zeros(2, 4), torch.zeros(2), -0.1)
