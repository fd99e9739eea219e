"""YAML configs: presets, base files, overrides, unknown keys named with their file, round trips."""

from dataclasses import replace
from pathlib import Path

import pytest

from maskrcnn.config import PRESETS, Config, ConfigError, paper_model, small_cpu_model, small_cpu_solver
from maskrcnn.config_io import load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path, text):
    path.write_text(text)
    return path


def test_a_preset_name_and_overrides():
    config = load_config("small_cpu", ["solver.base_lr=0.005", "model.rpn.aspect_ratios=[1.0]"])
    assert config.model.backbone == small_cpu_model().backbone
    assert config.solver.base_lr == 0.005 and config.model.rpn.aspect_ratios == (1.0,)


def test_a_file_starts_from_its_preset_then_sets_fields(tmp_path):
    path = write(tmp_path / "c.yaml", "preset: paper\nsolver: {base_lr: 0.01, steps: [0.6, 0.9]}\n"
                                      "model: {roi_heads: {num_classes: 5}}\n")
    config = load_config(path)
    assert config.model.input == paper_model().input
    assert config.model.roi_heads.num_classes == 5 and config.model.roi_heads.pooler_aligned
    assert config.solver.base_lr == 0.01 and config.solver.steps == (0.6, 0.9)


def test_base_files_chain_relative_to_the_including_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "preset: small_cpu\nsolver: {base_lr: 0.1, max_iter: 7}\n")
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\nsolver: {base_lr: 0.2}\n")
    leaf = write(tmp_path / "leaf.yaml", "base: sub/mid.yaml\nseed: 3\n")
    config = load_config(leaf, ["solver.max_iter=9"])
    assert config.model.backbone.depth == 18  # from root's preset
    assert (config.solver.base_lr, config.solver.max_iter, config.seed) == (0.2, 9, 3)


def test_unknown_keys_are_named_with_their_file(tmp_path):
    write(tmp_path / "base.yaml", "solver: {base_lr: 0.1, lr_steps: [1, 2]}\n")
    leaf = write(tmp_path / "leaf.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*solver\.lr_steps"):
        load_config(leaf)
    typo = write(tmp_path / "typo.yaml", "preset: small_cpu\nmodel: {backbone: {detph: 50}}\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*model\.backbone\.detph"):
        load_config(typo)
    with pytest.raises(ConfigError, match="unknown config key 'solver.nope'"):
        load_config("small_cpu", ["solver.nope=1"])


@pytest.mark.parametrize("text, message", [
    ("preset: big\n", "unknown preset 'big'"),
    ("preset: paper\nbase: x.yaml\n", "either 'base' or 'preset'"),
    ("base: c.yaml\n", "include each other"),
    ("solver: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("solver: {amp: maybe}\n", "expects true/false"),
    ("solver: {log_period: 0}\n", r"solver\.log_period: expects a whole number >= 1, got 0"),
    ("preset: small_cpu\nsolver: {ims_per_batch: 0}\n", r"solver\.ims_per_batch: expects a whole number >= 1"),
    ("model: {rpn: {loss_norm: Detectron2}}\n", r"model\.rpn\.loss_norm: unknown loss_norm 'Detectron2'"),
    ("model: {input: {size_rounding: nearest}}\n", r"model\.input\.size_rounding: .*floor, round"),
])
def test_mistakes_are_config_errors_naming_the_file(tmp_path, text, message):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "c.yaml" in str(info.value)


def test_overrides_of_a_preset_or_file_are_validated():
    with pytest.raises(ConfigError, match=r"solver\.log_period: expects a whole number >= 1, got 0"):
        load_config("small_cpu", ["solver.log_period=0"])
    with pytest.raises(ConfigError, match=r"model\.roi_heads\.paste: unknown paste 'Detectron2'"):
        load_config(CONFIGS / "paper_r50_fpn_1x.yaml", ["model.roi_heads.paste=Detectron2"])


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("source", [*PRESETS, *sorted(str(p) for p in CONFIGS.glob("*.yaml"))])
def test_save_then_load_gives_the_same_config(tmp_path, source):
    config = load_config(source)
    assert load_config(save_config(config, tmp_path / "out" / "saved.yaml")) == config


def test_the_shipped_recipes():
    paper = load_config(CONFIGS / "paper_r50_fpn_1x.yaml").solver
    assert (paper.ims_per_batch, paper.base_lr, paper.max_iter, paper.steps) == (16, 0.02, 90000, (60000, 80000))
    assert (paper.warmup_iters, paper.warmup_factor, paper.weight_decay) == (1000, 0.001, 1e-4)
    tv = load_config(CONFIGS / "torchvision_r50_fpn.yaml")
    epoch = tv.solver.max_iter / 26
    assert [s / epoch for s in tv.solver.steps] == pytest.approx([16, 22], abs=1e-3)
    assert tv.model == Config().model  # torchvision conventions are the defaults
    small = load_config(CONFIGS / "small_cpu_shapes.yaml")
    assert small.model.backbone.depth == 18 and small.data.train_json == "data/shapes/train.json"
    assert small.solver == replace(small_cpu_solver(), max_minutes=14)  # the preset's recipe
    assert small.solver.optimizer == "adamw" and load_config("paper").solver.optimizer == "sgd"
