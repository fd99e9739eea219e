import itertools

import pytest
import torch

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import TrainSchedule, build_test_loader, build_train_loader, collate, pad_batch
from maskrcnn.data.shapes import make_shapes
from maskrcnn.data.transforms import TrainTransform


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 14, 3, seed=2, workers=1)
    return CocoDataset(root / "train.json", root / "train")


def take(loader, n):
    return list(itertools.islice(loader, n))


def same_batches(a, b) -> bool:
    """Equal images, boxes, labels, masks and ids, batch by batch."""
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b, strict=True):
        for x, y, s, t in zip(images_a, images_b, targets_a, targets_b, strict=True):
            if not (torch.equal(x, y) and s["image_id"] == t["image_id"] and torch.equal(s["boxes"], t["boxes"])
                    and torch.equal(s["labels"], t["labels"])
                    and torch.equal(s["masks"].to_tensor(), t["masks"].to_tensor())):
                return False
    return True


def test_the_stream_is_a_function_of_seed_and_iteration(shapes):
    first = take(build_train_loader(shapes, batch_size=2, seed=3), 9)
    again = take(build_train_loader(shapes, batch_size=2, seed=3), 9)
    assert same_batches(first, again)
    other = take(build_train_loader(shapes, batch_size=2, seed=4), 9)
    assert [t["image_id"] for _, ts in first for t in ts] != [t["image_id"] for _, ts in other for t in ts]


def test_resuming_at_start_iter_equals_continuing(shapes):
    # 14 images in batches of 2: iterations 5..10 cross into the second epoch
    full = take(build_train_loader(shapes, batch_size=2, seed=1), 11)
    resumed = take(build_train_loader(shapes, batch_size=2, seed=1, start_iter=5), 6)
    assert same_batches(full[5:], resumed)


def test_two_workers_give_the_batches_of_none(shapes):
    serial = take(build_train_loader(shapes, batch_size=2, seed=7, start_iter=2), 5)
    parallel = take(build_train_loader(shapes, batch_size=2, seed=7, start_iter=2, num_workers=2), 5)
    assert same_batches(serial, parallel)


def test_flips_are_random_but_seeded_per_image(shapes):
    batches = take(build_train_loader(shapes, batch_size=2, seed=0, flip_prob=0.5), 14)
    flipped = 0
    for images, targets in batches:
        for image, target in zip(images, targets):
            raw, raw_target = shapes.load(shapes.image_ids.index(target["image_id"]))
            if torch.equal(image, raw):
                assert torch.equal(target["boxes"], raw_target["boxes"])
            else:
                assert torch.equal(image, raw.flip(-1))
                assert torch.equal(target["masks"].to_tensor(), raw_target["masks"].to_tensor().flip(-1))
                flipped += 1
    assert 4 <= flipped <= 24


def test_the_datasets_own_transforms_are_seeded_too(shapes):
    shapes.transforms = TrainTransform(flip_prob=0.5)
    try:
        a = take(build_train_loader(shapes, batch_size=2, seed=5, flip_prob=0.0), 6)
        b = take(build_train_loader(shapes, batch_size=2, seed=5, flip_prob=0.0, start_iter=3), 3)
        assert same_batches(a[3:], b)
        flipped = [not torch.equal(im, shapes.load(shapes.image_ids.index(t["image_id"]))[0])
                   for images, targets in a for im, t in zip(images, targets)]
        assert any(flipped)  # the dataset's 0.5 applies, not the loader's 0.0
    finally:
        shapes.transforms = None


class _TransformingItself(torch.utils.data.Dataset):
    """A data set that applies its ``transforms`` in ``__getitem__`` and has no ``load``."""

    transforms = TrainTransform(flip_prob=1.0)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        image = torch.arange(3, dtype=torch.uint8).view(1, 1, 3).expand(3, 2, 3).clone()
        return self.transforms(image, {"boxes": torch.zeros(0, 4), "image_id": index})


def test_a_data_set_that_transforms_itself_is_not_augmented_again():
    flipped = torch.tensor([2, 1, 0], dtype=torch.uint8)
    for images, _ in take(build_train_loader(_TransformingItself(), batch_size=2, seed=0), 4):
        assert all(torch.equal(im[0, 0], flipped) for im in images)  # never flipped back
    for images, _ in build_test_loader(_TransformingItself(), batch_size=2):
        assert all(torch.equal(im[0, 0], flipped) for im in images)


def test_ranks_partition_each_global_batch(shapes):
    whole = take(build_train_loader(shapes, batch_size=4, seed=9), 6)
    ranks = [take(build_train_loader(shapes, batch_size=2, seed=9, rank=r, world_size=2), 6) for r in range(2)]
    for it in range(6):
        images = ranks[0][it][0] + ranks[1][it][0]
        targets = ranks[0][it][1] + ranks[1][it][1]
        assert same_batches([whole[it]], [(images, targets)])  # same images, same flips


def test_schedule_groups_orientations_and_covers_each_epoch():
    ratios = [1.5, 0.7, 1.2, 0.8, 1.1, 0.6, 1.3, 0.9, 1.0, 0.5]  # 5 landscape (w >= h), 5 portrait
    schedule = TrainSchedule(ratios, batch_size=2, seed=0)
    # 2 landscape + 2 portrait batches, and the two leftovers together in one mixed batch
    assert schedule.batches_per_epoch == 5
    for epoch in range(3):
        batches = [schedule.global_batch(epoch * 5 + i) for i in range(5)]
        assert sorted(i for b in batches for i in b) == list(range(10))
        mixed = [b for b in batches if len({ratios[i] >= 1 for i in b}) > 1]
        assert len(mixed) == 1
    odd = TrainSchedule(ratios + [1.2], batch_size=2, seed=0)
    seen = [i for it in range(odd.batches_per_epoch) for i in odd.global_batch(it)]
    assert len(seen) == len(set(seen)) == 10  # one image waits for the next epoch
    ungrouped = TrainSchedule(ratios, batch_size=3, seed=0, aspect_ratio_grouping=False)
    assert ungrouped.batches_per_epoch == 3


def test_schedule_keys_depend_on_position_not_on_rank_count():
    ratios = [1.0] * 8
    whole = TrainSchedule(ratios, batch_size=4, seed=1)
    halves = [TrainSchedule(ratios, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    for it in range(5):
        assert halves[0].batch(it) + halves[1].batch(it) == whole.batch(it)


def test_schedule_rejects_impossible_settings():
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        TrainSchedule([1.0] * 5, batch_size=4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        TrainSchedule([1.0] * 5, batch_size=1, rank=2, world_size=2)


def test_test_loader_is_in_order_and_never_flips(shapes):
    shapes.transforms = TrainTransform(flip_prob=1.0)
    try:
        batches = list(build_test_loader(shapes, batch_size=4))
    finally:
        shapes.transforms = None
    assert [len(images) for images, _ in batches] == [4, 4, 4, 2]
    ids = [t["image_id"] for _, targets in batches for t in targets]
    assert ids == shapes.image_ids
    assert torch.equal(batches[0][0][1], shapes.load(1)[0])


def test_collate_and_pad_batch():
    images, targets = collate([(torch.ones(3, 2, 3), {"image_id": 1}), (torch.ones(3, 4, 1), {"image_id": 2})])
    assert [t["image_id"] for t in targets] == [1, 2]
    padded = pad_batch(images, divisor=4)
    assert padded.shape == (2, 3, 4, 4)
    assert padded[0, :, :2, :3].eq(1).all() and padded[0].sum() == 3 * 6
    assert padded[1, :, :, :1].eq(1).all() and padded[1].sum() == 3 * 4
    assert pad_batch([torch.zeros(3, 32, 33)]).shape == (1, 3, 32, 64)
