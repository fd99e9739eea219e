import pytest

from maskrcnn.config import (NORMS, OPTIMIZERS, PASTE_MODES, PRESETS, RESNET_DEPTHS,
                             SOLVER_PRESETS, Config, ConfigError, RPNConfig, SolverConfig,
                             apply_overrides, from_dict, preset_config, replace_nested, to_dict)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dicts(name):
    config = Config(model=PRESETS[name]())
    assert from_dict(Config, to_dict(config)) == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_its_recipe(name):
    config = preset_config(name)
    assert config.model == PRESETS[name]()
    assert config.solver == SOLVER_PRESETS.get(name, SolverConfig)()


def test_overrides_parse_values_and_reject_unknown_keys():
    config = apply_overrides(Config(), ["solver.base_lr=0.01", "model.rpn.anchor_sizes=[8,16]"])
    assert config.solver.base_lr == 0.01
    assert config.model.rpn.anchor_sizes == (8, 16)
    with pytest.raises(ConfigError, match="solver.base_lrr"):
        apply_overrides(Config(), ["solver.base_lrr=0.01"])
    with pytest.raises(ConfigError, match="expects a number"):
        apply_overrides(Config(), ["solver.base_lr=fast"])


def test_integer_keys_take_whole_numbers_only():
    assert apply_overrides(Config(), ["solver.max_iter=2e3"]).solver.max_iter == 2000
    with pytest.raises(ConfigError, match="solver.ims_per_batch' expects a whole number"):
        apply_overrides(Config(), ["solver.ims_per_batch=2.5"])
    assert apply_overrides(Config(), ["solver.base_lr=1"]).solver.base_lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("solver.log_period=0", "solver.log_period: expects a whole number >= 1, got 0"),
    ("solver.ims_per_batch=0", "solver.ims_per_batch: expects a whole number >= 1, got 0"),
    ("solver.max_iter=-1", "solver.max_iter: expects a whole number >= 0, got -1"),
    ("solver.checkpoint_period=-5", "solver.checkpoint_period: expects a whole number >= 0, got -5"),
    ("model.rpn.batch_size_per_image=0", "model.rpn.batch_size_per_image: expects a whole number >= 1"),
    ("model.rpn.post_nms_topk_test=0", "model.rpn.post_nms_topk_test: expects a whole number >= 1"),
    ("model.rpn.anchor_sizes=[32,0]", r"model.rpn.anchor_sizes: expects whole numbers >= 1, got \(32, 0\)"),
    ("model.roi_heads.num_classes=0", "model.roi_heads.num_classes: expects a whole number >= 1"),
    ("model.roi_heads.detections_per_img=0", "model.roi_heads.detections_per_img: expects a whole number >= 1"),
    ("model.roi_heads.mask_pooler_resolution=0", "model.roi_heads.mask_pooler_resolution: expects"),
    ("model.roi_heads.pooler_sampling_ratio=-1", "model.roi_heads.pooler_sampling_ratio: expects a whole number >= 0"),
    ("model.input.min_size_test=0", "model.input.min_size_test: expects a whole number >= 1"),
    ("model.input.min_size_train=[]", "model.input.min_size_train: expects at least one value"),
    ("model.backbone.groups=0", "model.backbone.groups: expects a whole number >= 1"),
    ("data.num_workers=-1", "data.num_workers: expects a whole number >= 0, got -1"),
    ("seed=-3", "seed: expects a whole number >= 0, got -3"),
    ("model.input.pixel_std=[0.2,0,0.2]", r"model.input.pixel_std: expects numbers > 0, got \(0.2, 0.0, 0.2\)"),
    ("model.input.pixel_scale=0", "model.input.pixel_scale: expects a number > 0, got 0.0"),
    ("model.rpn.fg_iou=1.5", "model.rpn.fg_iou: expects a number from 0 to 1, got 1.5"),
    ("model.rpn.nms_thresh=nan", "model.rpn.nms_thresh: expects a number from 0 to 1, got nan"),
    ("model.rpn.aspect_ratios=[0.5,0]", "model.rpn.aspect_ratios: expects numbers > 0"),
    ("model.rpn.aspect_ratios=[]", "model.rpn.aspect_ratios: expects at least one value"),
    ("model.rpn.bg_iou=0.8", "model.rpn.bg_iou=0.8 is above model.rpn.fg_iou=0.7"),
    ("model.roi_heads.score_thresh=-0.1", "model.roi_heads.score_thresh: expects a number from 0 to 1"),
    ("model.roi_heads.box_reg_weights=[10,10,0,5]", "model.roi_heads.box_reg_weights: expects numbers > 0"),
    ("model.roi_heads.mask_threshold=2", "model.roi_heads.mask_threshold: expects a number from 0 to 1"),
    ("solver.base_lr=-0.1", "solver.base_lr: expects a number >= 0, got -0.1"),
    ("solver.momentum=1", "solver.momentum: expects a number from 0 to below 1, got 1.0"),
    ("solver.gamma=0", "solver.gamma: expects a number > 0, got 0.0"),
    ("solver.steps=[-1]", r"solver.steps: expects numbers >= 0, got \(-1.0,\)"),
    ("solver.warmup_factor=1.5", "solver.warmup_factor: expects a number from 0 to 1"),
    ("data.flip_prob=1.1", "data.flip_prob: expects a number from 0 to 1, got 1.1"),
])
def test_out_of_range_values_are_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize("override", [
    "solver.warmup_iters=0", "solver.eval_period=0", "solver.checkpoint_period=0", "solver.max_iter=0",
    "data.num_workers=0", "model.backbone.freeze_at=0", "model.input.size_divisibility=0",
    "model.roi_heads.pooler_sampling_ratio=0", "model.roi_heads.mask_conv_dims=[]", "seed=0",
    "model.rpn.bg_iou=0.7", "model.roi_heads.score_thresh=0", "model.roi_heads.nms_thresh=1",
    "solver.momentum=0", "solver.weight_decay=0", "solver.warmup_factor=1", "data.flip_prob=0",
    "model.rpn.smooth_l1_beta=0",
])
def test_values_at_the_ends_of_their_range_stay_valid(override):
    """Zero where it has a meaning (no warm-up, no workers, ...), and the ends of closed ranges."""
    key, value = override.split("=")
    node = apply_overrides(Config(), [override])
    for part in key.split("."):
        node = getattr(node, part)
    assert node == (() if value == "[]" else float(value))


@pytest.mark.parametrize("override, message", [
    ("model.rpn.loss_norm=Detectron2",
     "model.rpn.loss_norm: unknown loss_norm 'Detectron2'; expects one of torchvision, detectron2"),
    ("model.roi_heads.mask_target=soft",
     "model.roi_heads.mask_target: unknown mask_target 'soft'; expects one of roi_align_soft, binary"),
    ("model.roi_heads.paste=d2", "model.roi_heads.paste: unknown paste 'd2'; expects one of torchvision, detectron2"),
    ("model.input.size_rounding=ceil",
     "model.input.size_rounding: unknown size_rounding 'ceil'; expects one of floor, round"),
    ("model.input.channel_order=bgr", "model.input.channel_order: unknown channel_order 'bgr'; expects one of RGB, BGR"),
    ("model.backbone.norm=SyncBN", "model.backbone.norm: unknown norm 'SyncBN'; expects one of FrozenBN, BN, GN"),
    ("model.backbone.depth=200", "model.backbone.depth: unknown depth 200; expects one of 18, 34, 50, 101, 152"),
    ("solver.optimizer=adam", "solver.optimizer: unknown optimizer 'adam'; expects one of sgd, adamw"),
    ("solver.schedule=linear", "solver.schedule: unknown schedule 'linear'; expects one of multistep, cosine"),
    ("device=gpu", "device: unknown device 'gpu'; expects one of auto, cpu, cuda, cuda:N"),
    ("device=cuda:x", "device: unknown device 'cuda:x'; expects one of auto, cpu, cuda, cuda:N"),
])
def test_unknown_choices_are_refused_listing_the_allowed_values(override, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [override])
    assert str(info.value) == message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_every_device_name_is_accepted(device):
    assert apply_overrides(Config(), [f"device={device}"]).device == device


def test_direct_construction_and_replace_are_validated_too():
    with pytest.raises(ConfigError, match="solver.log_period: expects a whole number >= 1, got 0"):
        SolverConfig(log_period=0)
    with pytest.raises(ConfigError, match="model.rpn.loss_norm: unknown loss_norm 'Detectron2'"):
        RPNConfig(loss_norm="Detectron2")
    with pytest.raises(ConfigError, match="model.roi_heads.mask_target: unknown mask_target 'Binary'"):
        replace_nested(Config(), **{"model.roi_heads.mask_target": "Binary"})


def test_the_allowed_values_are_those_the_code_handles():
    import torch

    from maskrcnn.engine.optimizer import build_optimizer
    from maskrcnn.modeling.resnet import BLOCKS, make_norm
    from maskrcnn.ops import paste_masks

    assert set(RESNET_DEPTHS) == set(BLOCKS)
    for norm in NORMS:
        make_norm(norm, 64)
    for name in OPTIMIZERS:
        build_optimizer(SolverConfig(optimizer=name), [{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    for mode in PASTE_MODES:
        paste_masks(torch.ones(1, 4, 4), torch.tensor([[1.0, 1.0, 3.0, 3.0]]), (4, 4), mode=mode)


def test_replace_nested_changes_only_the_named_field():
    config = replace_nested(Config(), **{"model.backbone.depth": 18})
    assert config.model.backbone.depth == 18
    assert config.model.rpn == Config().model.rpn
