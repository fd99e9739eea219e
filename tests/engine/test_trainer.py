import json
import os

import pytest
import torch

from maskrcnn.config import Config, DataConfig, SolverConfig, replace_nested, small_cpu_model
from maskrcnn.engine.checkpoint import NAME, load_checkpoint, save_checkpoint
from maskrcnn.engine.schedule import lr_at
from maskrcnn.engine.trainer import TrainingError, check_finite, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from maskrcnn.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 8, 3, seed=1)
    return root


def tiny_config(shapes, out, **solver):
    model = replace_nested(small_cpu_model(3), **{"input.min_size_train": (128,), "input.min_size_test": 128,
                                                  "input.max_size": 192})
    return Config(model=model, output_dir=str(out),
                  data=DataConfig(train_json=str(shapes / "train.json"), train_images=str(shapes / "train"),
                                  val_json=str(shapes / "val.json"), val_images=str(shapes / "val"),
                                  num_workers=0),
                  solver=SolverConfig(**{"ims_per_batch": 2, "base_lr": 0.01, "warmup_iters": 2,
                                         "max_iter": 6, "checkpoint_period": 3, "log_period": 1,
                                         "steps": (0.5,), **solver}))


def losses_of(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r]


@pytest.mark.slow
def test_resume_after_a_kill_logs_the_same_losses(shapes, tmp_path):
    full = tmp_path / "full"
    train(tiny_config(shapes, full), progress=False)
    killed = tmp_path / "killed"
    train(tiny_config(shapes, killed), progress=False, stop_at=4)  # dies after iteration 4; last ckpt at 3
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # what was logged by the checkpoint
    result = train(tiny_config(shapes, killed), resume=True, progress=False)
    assert losses_of(killed) == losses_of(full)
    # end to end: make-shapes -> train -> eval -> a results file pycocotools loads unchanged
    from pycocotools.coco import COCO

    assert set(result["metrics"]["segm"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    COCO(str(shapes / "val.json")).loadRes(str(killed / "results.json"))
    assert (killed / "model_final.safetensors").is_file()


def test_non_finite_loss_names_iteration_term_and_causes():
    with pytest.raises(TrainingError, match=r"iteration 12: non-finite loss_box_reg.*learning rate"):
        check_finite({"loss_mask": torch.tensor(0.3), "loss_box_reg": torch.tensor(float("nan"))}, 12)


def test_training_stops_on_nan_and_keeps_the_last_checkpoint(shapes, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="non-finite"):
        train(tiny_config(shapes, out, base_lr=1e6, warmup_iters=0, max_iter=40, checkpoint_period=1),
              progress=False)
    from maskrcnn.modeling.mask_rcnn import build_model

    model = build_model(small_cpu_model(3))
    info = load_checkpoint(out / NAME, model=model)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
    assert info["iteration"] >= 1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=5)
    before = (tmp_path / NAME).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(os, "replace", crash)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=6)
    assert (tmp_path / NAME).read_bytes() == before
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    assert load_checkpoint(tmp_path / NAME, model=fresh, optimizer=fresh_opt)["iteration"] == 5
    assert torch.equal(fresh.weight, model.weight - 1)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])


def test_schedule_warmup_steps_and_cosine():
    s = SolverConfig(base_lr=0.02, warmup_iters=100, warmup_factor=0.001, steps=(600, 800))
    assert lr_at(0, s, 1000) == pytest.approx(2e-5)
    assert lr_at(100, s, 1000) == pytest.approx(0.02)
    assert lr_at(700, s, 1000) == pytest.approx(0.002)
    assert lr_at(900, s, 1000) == pytest.approx(0.0002)
    c = SolverConfig(base_lr=0.02, warmup_iters=0, schedule="cosine")
    assert lr_at(500, c, 1000) == pytest.approx(0.01)
    assert lr_at(1000, c, 1000) == pytest.approx(0.0)
