"""The training loop on the real small model: exact resume after a kill, a clear stop on
non-finite losses with the last checkpoint kept, images without objects, wall-time budgets."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from maskrcnn.config import Config, ConfigError, DataConfig, SolverConfig, replace_nested, small_cpu_model
from maskrcnn.engine.checkpoint import last_checkpoint, load_checkpoint, read_checkpoint_info
from maskrcnn.engine.trainer import TimeBudget, TrainingError, check_finite, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from maskrcnn.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 6, 2, seed=1)
    return root


def tiny_config(data, out, val=True, **solver):
    """The small CPU model on 128-px images, 2 images per batch."""
    model = replace_nested(small_cpu_model(3), **{"input.min_size_train": (128,), "input.min_size_test": 128,
                                                  "input.max_size": 160})
    return Config(model=model, output_dir=str(out), seed=3,
                  data=DataConfig(train_json=str(data / "train.json"), train_images=str(data / "train"),
                                  val_json=str(data / "val.json") if val else "",
                                  val_images=str(data / "val") if val else "", num_workers=0),
                  solver=SolverConfig(**{"ims_per_batch": 2, "base_lr": 0.01, "warmup_iters": 2, "max_iter": 4,
                                         "checkpoint_period": 2, "log_period": 1, "steps": (0.6,), **solver}))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def kill_after(iteration):
    def callback(it, losses):
        if it == iteration:
            raise Killed

    return callback


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_run_killed_and_resumed_logs_exactly_what_an_uninterrupted_run_logs(shapes, tmp_path, optimizer):
    """Kill after iteration 3 (checkpoint and evaluation at 2), resume: the same losses and
    learning rates bit for bit, the same final weights, no duplicated log rows."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    settings = {"eval_period": 2, "optimizer": optimizer}
    train(tiny_config(shapes, full, **settings), progress=False)
    with pytest.raises(Killed):
        train(tiny_config(shapes, killed, **settings), progress=False, callbacks=[kill_after(3)])
    assert read_checkpoint_info(killed / "checkpoints")["iteration"] == 2
    assert [r["iteration"] for r in rows(killed)] == [1, 2, 2, 3]  # 3 was logged, then the kill
    result = train(tiny_config(shapes, killed, **settings), resume=True, progress=False)

    def losses(out):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows(out) if "total_loss" in r]

    assert losses(killed) == losses(full) and len(losses(full)) == 4
    assert [r["iteration"] for r in rows(killed)] == [r["iteration"] for r in rows(full)]
    final, resumed = load_file(full / "model_final.safetensors"), load_file(killed / "model_final.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert result["iterations"] == 4 and result["metrics"]["segm"]["AP"] is not None


def test_a_run_killed_during_an_evaluation_resumes_before_it(shapes, tmp_path, monkeypatch):
    """The evaluation at 4 runs before the checkpoint at 4: killed during it, the run resumes from
    the checkpoint at 2 and logs that evaluation, as an uninterrupted run does."""
    import maskrcnn.evaluation.coco_eval as coco_eval

    settings = {"max_iter": 6, "eval_period": 2, "checkpoint_period": 2}
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(tiny_config(shapes, full, **settings), progress=False)
    real, calls = coco_eval.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluation at iteration 4
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(coco_eval, "evaluate", evaluate)
    with pytest.raises(Killed):
        train(tiny_config(shapes, killed, **settings), progress=False)
    assert read_checkpoint_info(killed / "checkpoints")["iteration"] == 2
    monkeypatch.setattr(coco_eval, "evaluate", real)
    train(tiny_config(shapes, killed, **settings), resume=True, progress=False)

    def logged(out):
        return [(r["iteration"], "total_loss" in r) for r in rows(out)]

    assert logged(killed) == logged(full)
    assert [r["iteration"] for r in rows(full) if "segm" in r] == [2, 4, 6]


def test_checkpoints_after_a_resume_record_the_last_evaluation(shapes, tmp_path):
    """Evaluation at 2, checkpoints at every iteration: killed after 2 and resumed, the
    checkpoint at 3 records the AP of iteration 2, as in an uninterrupted run."""
    settings = {"eval_period": 2, "checkpoint_period": 1}
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(tiny_config(shapes, full, **settings), progress=False)
    with pytest.raises(Killed):
        train(tiny_config(shapes, killed, **settings), progress=False, callbacks=[kill_after(2)])
    train(tiny_config(shapes, killed, **settings), resume=True, progress=False)
    recorded = [read_checkpoint_info(out / "checkpoints" / "iter_0000003")["extra"]["metrics"]
                for out in (full, killed)]
    assert recorded[0] == recorded[1] and recorded[0]["segm"]["AP"] is not None


def test_a_resumed_run_trains_with_the_solver_settings_it_is_given(shapes, tmp_path, capsys):
    """The checkpoint's optimizer state carries over, its settings do not: resumed with another
    momentum and weight decay, the run uses (and its next checkpoint records) the new ones, and
    says what changed."""
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny_config(shapes, out, val=False), progress=False, callbacks=[kill_after(2)])
    capsys.readouterr()
    train(tiny_config(shapes, out, val=False, momentum=0.5, weight_decay=0.001), resume=True, progress=False)
    assert "momentum 0.9 -> 0.5, weight_decay 0.0001 -> 0.001" in capsys.readouterr().out
    groups = read_checkpoint_info(out / "checkpoints")["param_groups"]
    assert [(g["momentum"], g["weight_decay"]) for g in groups] == [(0.5, 0.001), (0.5, 0.0)]


def test_resuming_with_another_optimizer_is_refused(shapes, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny_config(shapes, out, val=False), progress=False, callbacks=[kill_after(2)])
    with pytest.raises(ConfigError, match="solver.optimizer=adamw, but the checkpoint .* solver.optimizer=sgd"):
        train(tiny_config(shapes, out, val=False, optimizer="adamw"), resume=True, progress=False)


def test_a_non_finite_loss_stops_naming_iteration_term_and_causes_and_keeps_the_checkpoint(
        shapes, tmp_path, monkeypatch):
    import maskrcnn.modeling.mask_rcnn as mask_rcnn

    real_build = mask_rcnn.build_model

    def build_with_a_bad_third_step(config):
        model = real_build(config)
        forward, calls = model.forward, []

        def forward_nan_at_3(images, targets=None):
            losses = forward(images, targets)
            calls.append(1)
            if len(calls) == 3:
                losses["loss_box_reg"] = losses["loss_box_reg"] * float("inf")
            return losses

        model.forward = forward_nan_at_3
        return model

    monkeypatch.setattr(mask_rcnn, "build_model", build_with_a_bad_third_step)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError) as info:
        train(tiny_config(shapes, out, val=False), progress=False)
    message = str(info.value)
    assert message.startswith("iteration 3: non-finite loss_box_reg")
    for cause in ("learning rate", "[x, y, w, h]", "zero-size", "amp"):
        assert cause in message
    assert "iter_0000002" in message and last_checkpoint(out / "checkpoints").name == "iter_0000002"
    model = real_build(tiny_config(shapes, out).model)
    assert load_checkpoint(out / "checkpoints", model=model)["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert [r["iteration"] for r in rows(out)] == [1, 2]


def test_check_finite_accepts_tensors_and_floats():
    check_finite({"a": torch.tensor(1.0), "b": 2.0}, 1)
    with pytest.raises(TrainingError, match=r"iteration 7: non-finite a \(inf\), b \(nan\).*no checkpoint"):
        check_finite({"a": torch.tensor(float("inf")), "b": float("nan"), "c": 0.0}, 7)


def test_images_without_objects_train_with_finite_and_zero_box_and_mask_losses(shapes, tmp_path):
    data = tmp_path / "empty"
    shutil.copytree(shapes, data)
    coco = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps({**coco, "annotations": []}))
    seen = []
    train(tiny_config(data, tmp_path / "out", val=False, max_iter=2), progress=False,
          callbacks=[lambda it, losses: seen.append(losses)])
    assert len(seen) == 2
    for losses in seen:
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                               "loss_mask"}
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
        assert losses["loss_rpn_box_reg"] == losses["loss_box_reg"] == losses["loss_mask"] == 0.0
        assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0


def test_the_class_count_comes_from_the_data_and_categories_must_agree(shapes, tmp_path):
    from maskrcnn.data.validate import DataError

    config = replace_nested(tiny_config(shapes, tmp_path / "a", val=False, max_iter=1),
                            **{"model.roi_heads.num_classes": 90})
    result = train(config, progress=False)
    assert result["model"].num_classes == 3
    data = tmp_path / "other"
    shutil.copytree(shapes, data)
    val = json.loads((data / "val.json").read_text())
    val["categories"] = val["categories"][:2]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] in {c["id"] for c in val["categories"]}]
    (data / "val.json").write_text(json.dumps(val))
    with pytest.raises(DataError, match="same categories"):
        train(tiny_config(data, tmp_path / "b"), progress=False)


def test_cpu_training_is_channels_last_and_saves_ordinary_weights(shapes, tmp_path):
    """On the CPU the model trains in oneDNN's channels-last layout, its 3x3 convs taking the
    matrix-product weight gradient; the saved weights are the same values, under the usual names."""
    from maskrcnn.modeling.mask_rcnn import build_model
    from maskrcnn.ops.training_conv import TrainingConv2d

    result = train(tiny_config(shapes, tmp_path / "run", val=False, max_iter=1), progress=False)
    model = result["model"]
    weight = model.backbone.body.layer1[0].conv1.weight
    assert model.channels_last and not weight.is_contiguous()
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(model.backbone.body.layer4[1].conv2, TrainingConv2d)
    saved = load_file(tmp_path / "run" / "model_final.safetensors")
    assert torch.equal(saved["backbone.body.layer1.0.conv1.weight"], weight.detach())
    assert saved.keys() == build_model(result["model"].config).state_dict().keys()


def test_checkpoint_weights_carry_the_final_weight_files_metadata(shapes, tmp_path):
    from safetensors import safe_open

    from maskrcnn.weights import read_weights

    out = tmp_path / "run"
    result = train(tiny_config(shapes, out, val=False, max_iter=1), progress=False)
    files = [out / "model_final.safetensors", last_checkpoint(out / "checkpoints") / "model.safetensors"]
    final, checkpoint = (safe_open(str(f), "pt").metadata() for f in files)
    assert checkpoint == final
    _, config, names, ids = read_weights(files[1])
    assert config == result["model"].config
    assert (names, ids) == (result["train_set"].class_names, result["train_set"].category_ids)


def test_the_training_curves_plot_every_logged_loss_and_the_ap(shapes, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from maskrcnn.visualize import plot_training_curves

    out = tmp_path / "run"
    train(tiny_config(shapes, out, max_iter=2, eval_period=1), progress=False)
    losses = {k for r in rows(out) for k in r if k.startswith("loss")}
    assert "loss_mask" in losses
    plotted, real_plot = {}, Axes.plot

    def plot(self, *args, label=None, **kwargs):
        plotted[label] = [list(a) for a in args]
        return real_plot(self, *args, label=label, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    assert plot_training_curves(out / "metrics.jsonl", tmp_path / "curves.png").is_file()
    assert set(plotted) == losses | {"total_loss", "bbox AP", "segm AP"}
    assert plotted["total_loss"][0] == [1, 2] and plotted["segm AP"][0] == [1, 2]


def test_a_fresh_start_in_a_used_folder_moves_the_old_checkpoints_aside_and_empties_the_log(shapes, tmp_path):
    """Only the latest earlier run's checkpoints are kept, as ``checkpoints.previous``."""
    out = tmp_path / "run"
    train(tiny_config(shapes, out, val=False, max_iter=1), progress=False)
    train(tiny_config(shapes, out, val=False, max_iter=2), progress=False)
    assert read_checkpoint_info(out / "checkpoints.previous")["iteration"] == 1
    assert [r["iteration"] for r in rows(out)] == [1, 2]
    train(tiny_config(shapes, out, val=False, max_iter=1), progress=False)
    assert read_checkpoint_info(out / "checkpoints.previous")["iteration"] == 2  # the first run's are gone
    assert read_checkpoint_info(out / "checkpoints")["iteration"] == 1
    assert [r["iteration"] for r in rows(out)] == [1]


def test_time_budget_sizes_the_schedule_from_the_measured_speed():
    now = [0.0]
    budget = TimeBudget(100.0, start_iter=0, cap=10_000, clock=lambda: now[0])
    max_iter = 10_000
    for it in range(30):
        max_iter = budget.update(it, max_iter)
        now[0] += 3.0 if it < 5 else 1.0  # slow first iterations are not counted
    assert max_iter == 25 + int((100 - 35) / 1.0)
    now[0] = 100.0
    assert budget.update(31, max_iter) == 31  # time is up: stop now


def test_time_budget_respects_the_cap_and_time_spent_before_a_resume():
    now = [0.0]
    budget = TimeBudget(100.0, start_iter=50, cap=60, spent=40.0, clock=lambda: now[0])
    max_iter = 60
    for it in range(50, 76):
        max_iter = budget.update(it, max_iter)
        now[0] += 1.0
    assert max_iter == 60
    budget = TimeBudget(100.0, start_iter=50, cap=10_000, spent=40.0, clock=lambda: now[0])
    now[0] += 60.0
    assert budget.update(50, 10_000) == 50


def test_a_finished_wall_time_run_is_extended_by_a_larger_budget(shapes, tmp_path, capsys):
    """A run that ended at its deadline stopped at its own max_iter; resumed with more minutes
    (or a larger cap), it trains on until the new deadline or the cap."""
    out = tmp_path / "run"
    first = train(tiny_config(shapes, out, val=False, max_minutes=0.001, max_iter=3), progress=False)
    assert first["iterations"] < 3
    assert read_checkpoint_info(out / "checkpoints")["extra"]["max_iter"] == first["iterations"]
    capsys.readouterr()
    result = train(tiny_config(shapes, out, val=False, max_minutes=1.0, max_iter=3), resume=True, progress=False)
    assert "max_minutes 0.001 -> 1.0" in capsys.readouterr().out
    assert result["iterations"] == 3 and read_checkpoint_info(out / "checkpoints")["iteration"] == 3
    assert [r["iteration"] for r in rows(out)] == list(range(1, 4))
    result = train(tiny_config(shapes, out, val=False, max_minutes=1.0, max_iter=3), resume=True, progress=False)
    assert result["iterations"] == 3  # ended at its cap: nothing more to do


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(shapes, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny_config(shapes, out, val=False), progress=False, callbacks=[kill_after(3)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "lr": 0.0')  # the kill came while the row was written
    train(tiny_config(shapes, out, val=False), resume=True, progress=False)
    assert [r["iteration"] for r in rows(out)] == [1, 2, 3, 4]


def test_bf16_training_is_refused_without_bf16_instructions_and_resumes_exactly(shapes, tmp_path, monkeypatch):
    """bf16 keeps the weights channels-last while checkpoints are plain tensors: a killed and
    resumed bf16 run still logs and ends exactly as an uninterrupted one."""
    from maskrcnn import precision

    def config(out):
        return replace_nested(tiny_config(shapes, out, val=False, optimizer="adamw"), device="cpu",
                              **{"solver.bf16": True})

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="solver.bf16: bf16 needs a CPU with bfloat16 instructions"):
        train(config(tmp_path / "refused"), progress=False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # emulated where the CPU lacks it
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = train(config(full), progress=False)
    assert result["iterations"] == 4 and result["model"].bf16
    with pytest.raises(Killed):
        train(config(killed), progress=False, callbacks=[kill_after(3)])
    train(config(killed), resume=True, progress=False)

    def losses(out):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows(out) if "total_loss" in r]

    assert losses(killed) == losses(full) and len(losses(full)) == 4
    assert all(math.isfinite(r["total_loss"]) for r in losses(full))
    final, resumed = load_file(full / "model_final.safetensors"), load_file(killed / "model_final.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_on_cuda_trains_checkpoints_the_gpu_generator_and_resumes(shapes, tmp_path):
    out = tmp_path / "cuda"
    config = replace_nested(tiny_config(shapes, out, val=False, max_iter=3, checkpoint_period=1),
                            device="cuda", **{"solver.amp": True})
    with pytest.raises(Killed):
        train(config, progress=False, callbacks=[kill_after(2)])
    state = load_file(last_checkpoint(out / "checkpoints") / "state.safetensors")
    assert "rng.cuda.0" in state
    assert read_checkpoint_info(out / "checkpoints")["scaler"]["scale"] > 0  # GradScaler state kept
    result = train(config, resume=True, progress=False)
    assert result["iterations"] == 3 and next(result["model"].parameters()).is_cuda
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in rows(out))


def test_init_backbone_loads_imagenet_weights_from_a_pth_file(shapes, tmp_path):
    from maskrcnn.engine.trainer import seed_everything
    from maskrcnn.modeling.mask_rcnn import build_model

    config = tiny_config(shapes, tmp_path / "run", val=False, max_iter=0)
    torch.manual_seed(123)
    body = build_model(config.model).backbone.body.state_dict()
    imagenet = {k: v for k, v in body.items() if not k.endswith("num_batches_tracked")}
    imagenet["fc.weight"] = torch.zeros(1000, 512)  # the classifier of an ImageNet file is ignored
    torch.save(imagenet, tmp_path / "resnet18.pth")
    model = train(config, init_backbone=tmp_path / "resnet18.pth", progress=False)["model"]
    got = model.backbone.body.state_dict()
    assert all(torch.equal(got[k], v) for k, v in imagenet.items() if k != "fc.weight")
    seed_everything(config.seed)  # what train() would have initialised without the file
    assert not torch.equal(build_model(config.model).backbone.body.conv1.weight, got["conv1.weight"])
    del imagenet["layer4.1.bn2.bias"]
    imagenet["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)  # a ResNet-50's
    torch.save(imagenet, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"init_backbone: .*other.pth holds ResNet-18 weights that do not fit "
                                          r"the model's backbone \(1 of its tensors not in the file, 1 in the "
                                          r"file not in it or of another shape, e.g. layer1.0.conv1.weight "
                                          r"\(64, 64, 1, 1\)\)"):
        train(config, init_backbone=tmp_path / "other.pth", progress=False)


def test_cpu_training_kernels_give_the_plain_models_losses_and_gradients(monkeypatch):
    """The kernels the trainer swaps in on the CPU, the RPN conv's gradients among them taken at
    the pixels of the sampled anchors only: the same losses and gradients as the plain model's,
    to float rounding."""
    import copy

    from maskrcnn.engine.trainer import cpu_training_kernels
    from maskrcnn.modeling.mask_rcnn import build_model
    from maskrcnn.ops import training_conv

    torch.manual_seed(0)
    plain = build_model(replace_nested(small_cpu_model(3), **{"input.min_size_train": (128,),
                                                              "input.max_size": 160})).train()
    fast = cpu_training_kernels(copy.deepcopy(plain))
    plain.use_channels_last()  # the same forward: the layout alone moves oneDNN's rounding
    assert fast.rpn.head.conv.sparse_grad
    images = [torch.rand(3, 120, 160), torch.rand(3, 128, 150)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0], [60.0, 5.0, 150.0, 60.0]]),
                "labels": torch.tensor([1, 2]), "masks": torch.zeros(2, *im.shape[1:], dtype=torch.uint8)}
               for im in images]
    for t in targets:
        for mask, (x1, y1, x2, y2) in zip(t["masks"], t["boxes"].int().tolist()):
            mask[y1:y2, x1:x2] = 1
    calls = []
    real = training_conv.grads_at_pixels
    monkeypatch.setattr(training_conv, "grads_at_pixels", lambda *a: calls.append(1) or real(*a))
    results = []
    for model in (fast, plain):
        torch.manual_seed(1)  # the same anchor and RoI samples
        losses = model(images, targets)
        sum(losses.values()).backward()
        results.append((losses, {k: p.grad for k, p in model.named_parameters()}))
    assert len(calls) == 5  # the RPN conv on each of the five levels
    (fast_losses, fast_grads), (plain_losses, plain_grads) = results
    torch.testing.assert_close(fast_losses, plain_losses, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(),
                                   msg=name)
