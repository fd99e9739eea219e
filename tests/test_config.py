import pytest

from maskrcnn.config import (PRESETS, Config, ConfigError, apply_overrides, from_dict,
                             replace_nested, to_dict)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dicts(name):
    config = Config(model=PRESETS[name]())
    assert from_dict(Config, to_dict(config)) == config


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


def test_replace_nested_changes_only_the_named_field():
    config = replace_nested(Config(), **{"model.backbone.depth": 18})
    assert config.model.backbone.depth == 18
    assert config.model.rpn == Config().model.rpn
