"""Checkpoints: exact round trip, atomic against a kill at any point, never unpickled."""

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

import maskrcnn.engine.checkpoint as ckpt
from maskrcnn.engine.checkpoint import CheckpointError, last_checkpoint, load_checkpoint, load_weights, \
    read_checkpoint_info, save_checkpoint


def trained(seed=0):
    """A small model with BN buffers and an SGD optimizer holding momentum after two steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        model(torch.randn(2, 3, 6, 6)).square().sum().backward()
        opt.step()
    return model, opt


def fresh():
    model, _ = trained(seed=1)
    return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.1)


def test_round_trip_restores_weights_optimizer_iteration_extra_and_rng(tmp_path):
    model, opt = trained()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    folder = save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=300,
                             extra={"max_iter": 900, "config": {"seed": 1}}, model_metadata={"k": "v"})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    other, other_opt = fresh()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    info = load_checkpoint(tmp_path, model=other, optimizer=other_opt)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert info["iteration"] == 300 and info["extra"] == {"max_iter": 900, "config": {"seed": 1}}
    assert info["path"] == folder == last_checkpoint(tmp_path)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert other_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for a, b in zip(opt.state_dict()["state"].values(), other_opt.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_numpy_and_python_generators_are_restored_too(tmp_path):
    model, opt = trained()
    np.random.seed(3), random.seed(3), random.gauss(0, 1)  # a cached Gaussian is state too
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=1)
    expected = (np.random.rand(4).tolist(), random.gauss(0, 1), random.random())
    np.random.seed(0), random.seed(0)
    load_checkpoint(tmp_path, model=model)
    assert (np.random.rand(4).tolist(), random.gauss(0, 1), random.random()) == expected


def test_optimizer_state_gets_its_parameters_layout_back(tmp_path):
    """A fused optimizer reads a parameter and its state as flat memory: a channels-last weight
    with contiguous moments would be updated with another element's moments."""
    x = torch.randn(2, 4, 6, 6)

    def make():
        torch.manual_seed(0)
        conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
        return conv, torch.optim.AdamW(conv.parameters(), lr=0.1, fused=True)

    def step(conv, opt):
        conv(x).square().sum().backward()
        opt.step(), opt.zero_grad()

    model, opt = make()
    step(model, opt)
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=1)
    other, other_opt = make()
    load_checkpoint(tmp_path, model=other, optimizer=other_opt)
    assert other_opt.state[other.weight]["exp_avg"].stride() == other.weight.stride()
    step(model, opt), step(other, other_opt)
    assert torch.equal(model.weight, other.weight)


def test_a_kill_while_renaming_the_folder_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained()
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=5)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=6)
    monkeypatch.undo()
    other, other_opt = fresh()
    assert load_checkpoint(tmp_path, model=other, optimizer=other_opt)["iteration"] == 5
    assert torch.equal(other[0].weight, before)
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=6)  # the next save tidies up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "iter_0000006", "last"]


def test_a_kill_while_writing_a_file_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained()
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=5)
    real = ckpt.save_file

    def half_written(tensors, filename, metadata=None):
        if "state" in os.path.basename(filename):
            with open(filename, "wb") as f:
                f.write(b"\x00" * 10)
            raise KeyboardInterrupt("killed")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=6)
    assert load_checkpoint(tmp_path, model=fresh()[0])["iteration"] == 5


def test_a_full_disk_is_a_clear_error_that_leaves_no_partial_folder(tmp_path, monkeypatch):
    model, opt = trained()
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=5)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"iteration 6 .*No space left.*iter_0000005, is unchanged"):
        save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "last"]
    assert read_checkpoint_info(tmp_path)["iteration"] == 5


def test_a_kill_before_the_pointer_moves_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained()
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=5)
    real, calls = os.replace, []

    def second_call_killed(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_call_killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=6)
    monkeypatch.undo()
    assert str(calls[1]).endswith("last")
    assert read_checkpoint_info(tmp_path)["iteration"] == 5
    folder = save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=6)  # replaces the orphan
    assert folder.name == "iter_0000006" and read_checkpoint_info(tmp_path)["iteration"] == 6


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    model, opt = trained()
    folder = save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=2)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "state.json", "state.safetensors"]
    json.loads((folder / "state.json").read_text())

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    other, other_opt = fresh()
    load_checkpoint(folder, model=other, optimizer=other_opt)
    assert set(load_weights(folder)) == set(model.state_dict())


def test_older_checkpoints_are_pruned_and_a_second_save_at_one_iteration_is_kept(tmp_path):
    model, opt = trained()
    for it in (1, 2, 3, 4):
        save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=it, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000004", "last"]
    again = save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=4, extra={"n": 2}, keep=2)
    assert again.name == "iter_0000004_1" and read_checkpoint_info(tmp_path)["extra"] == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "iter_0000004_1", "last"]


def test_load_weights_reads_files_and_folders_only_as_safetensors(tmp_path):
    model, opt = trained()
    folder = save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=1, model_metadata={"a": "b"})
    by_file = load_weights(folder / "model.safetensors")
    assert all(torch.equal(by_file[k], v) for k, v in model.state_dict().items())
    assert set(load_weights(tmp_path)) == set(by_file)
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="never unpickled"):
        load_weights(tmp_path / "w.pth")


def test_a_checkpoint_of_another_model_is_a_clear_error_naming_keys_and_shapes(tmp_path):
    model, opt = trained()
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=1)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(tmp_path, model=nn.Linear(2, 2))
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, model=other)
    assert str(info.value).endswith("does not fit this model (was the model config changed since it was "
                                    "written?): 3.weight (2, 64) in the file, (3, 64) in the model; "
                                    "3.bias (2,) in the file, (3,) in the model")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing loaded
    with pytest.raises(CheckpointError, match=r"\?\): (\S+ only in the file; ){2}\S+ only in the file and 4 more$"):
        load_checkpoint(tmp_path, model=nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity(), nn.Linear(64, 2)))
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(tmp_path / "missing")


def test_extra_that_is_not_json_fails_before_anything_is_written(tmp_path):
    model, opt = trained()
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=1)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=2, extra={"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "last"]
