"""The weight file: round trip with its metadata, and a failed write that leaves no trace."""

import os
from pathlib import Path

import pytest
import torch

import safetensors.torch
from maskrcnn.config import small_cpu_model
from maskrcnn.modeling.mask_rcnn import build_model
from maskrcnn.weights import read_weights, save_weights


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(small_cpu_model(2))


def test_round_trip_keeps_tensors_config_and_class_metadata(tmp_path, model):
    path = save_weights(tmp_path / "w.safetensors", model, class_names=["cat", "dog"], category_ids=[3, 7])
    state, config, names, ids = read_weights(path)
    assert config == model.config and names == ["cat", "dog"] and ids == [3, 7]
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


def test_a_full_disk_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, model, monkeypatch):
    path = save_weights(tmp_path / "w.safetensors", model, class_names=["cat", "dog"])

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match=r"w.safetensors: could not write.*No space left.*unchanged"):
        save_weights(path, model, class_names=["x", "y"])
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert read_weights(path)[2] == ["cat", "dog"]


def test_the_file_is_fsynced_before_it_replaces_the_old_one_and_the_folder_after(tmp_path, model, monkeypatch):
    import maskrcnn.atomic as atomic

    events, real_fsync, real_replace = [], atomic.fsync, os.replace

    def fsync(path):
        events.append(("fsync", Path(path)))
        real_fsync(path)

    def replace(src, dst):
        events.append(("replace", Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = save_weights(tmp_path / "w.safetensors", model)
    tmp = events[0][1]
    assert tmp.parent == tmp_path and tmp != path
    assert events == [("fsync", tmp), ("replace", tmp, path), ("fsync", tmp_path)]
    assert read_weights(path)[2] == ["class_1", "class_2"]


def test_an_interrupt_while_writing_keeps_the_old_file_and_leaves_no_temporary(tmp_path, model, monkeypatch):
    path = save_weights(tmp_path / "w.safetensors", model, class_names=["cat", "dog"])

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_weights(path, model, class_names=["x", "y"])
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert read_weights(path)[2] == ["cat", "dog"]
