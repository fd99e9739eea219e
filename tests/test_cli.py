"""Each command: the happy path on tiny inputs, and user mistakes ending in one line, exit 2."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from maskrcnn.config import replace_nested, small_cpu_model
from maskrcnn.modeling.mask_rcnn import build_model
from maskrcnn.weights import save_weights


def run(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "maskrcnn.cli", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def assert_user_error(code, out, err, text):
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and text in lines[0], lines


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    code, out, err = run("make-shapes", root / "data", "--train", 3, "--val", 2, "--seed", 3)
    assert code == 0, err
    return root


@pytest.fixture(scope="module")
def weights(shapes):
    torch.manual_seed(0)
    cfg = replace_nested(small_cpu_model(3), **{"input.min_size_test": 128, "input.max_size": 192,
                                               "roi_heads.score_thresh": 0.0})
    return save_weights(shapes / "w.safetensors", build_model(cfg), class_names=["circle", "triangle", "rectangle"],
                        category_ids=[1, 3, 7])  # the shapes set's own ids, as training writes them


@pytest.mark.parametrize("command", ["demo", "train", "eval", "predict", "make-shapes", "check-data", "convert"])
def test_every_command_has_help_with_an_example(command):
    code, out, _ = run(command, "--help")
    assert code == 0 and "example:" in out and "maskrcnn " + command in out


def test_make_shapes_and_check_data(shapes):
    data = json.loads((shapes / "data" / "train.json").read_text())
    assert len(data["images"]) == 3
    code, out, _ = run("check-data", shapes / "data" / "train.json", "--images", shapes / "data" / "train")
    assert code == 0 and "no problems" in out
    assert_user_error(*run("check-data", shapes / "nope.json", "--images", shapes), "nope.json: no such file")


def test_predict_writes_overlays_results_and_masks(shapes, weights, tmp_path):
    out = tmp_path / "pred"
    code, stdout, err = run("predict", shapes / "data" / "val", "--weights", weights, "--out", out,
                            "--score-threshold", 0.0, "--save-masks", "--batch-size", 2)
    assert code == 0, err
    assert len(list(out.glob("*_overlay.png"))) == 2
    results = json.loads((out / "results.json").read_text())
    assert results and {"bbox", "score", "segmentation", "category_id"} <= results[0].keys()
    assert list(out.glob("*_mask*.png"))


def test_predict_names_outputs_of_inputs_with_one_stem_apart_and_records_coco_results(shapes, weights, tmp_path):
    import numpy as np
    import pycocotools.mask as mask_util
    from PIL import Image

    val = sorted((shapes / "data" / "val").glob("*.png"))
    inputs = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"]
    for source, target in zip(val, inputs):
        target.parent.mkdir()
        target.write_bytes(source.read_bytes())
    sizes = [Image.open(p).size for p in inputs]
    assert sizes[0] != sizes[1]
    out = tmp_path / "pred"
    code, _, err = run("predict", *inputs, "--weights", weights, "--out", out, "--score-threshold", 0.0,
                       "--save-masks")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*_overlay.png")) == ["x_1_overlay.png", "x_2_overlay.png"]
    assert [Image.open(out / f"x_{n}_overlay.png").size for n in (1, 2)] == sizes
    results = json.loads((out / "results.json").read_text())
    for image_id, (path, (width, height)) in enumerate(zip(inputs, sizes)):
        mine = [r for r in results if r["file_name"] == str(path)]
        assert mine and {r["image_id"] for r in mine} == {image_id}
        assert len(list(out.glob(f"x_{image_id + 1}_mask*.png"))) == len(mine)
        for r in mine:
            x, y, w, h = r["bbox"]
            assert 0 <= x <= x + w <= width and 0 <= y <= y + h <= height  # [x, y, w, h], not xyxy
            assert r["segmentation"]["size"] == [height, width]
            assert mask_util.decode(r["segmentation"]).shape == (height, width)
            assert r["class_name"] == {1: "circle", 3: "triangle", 7: "rectangle"}[r["category_id"]]
        # each instance's mask PNG holds its mask as 0 and 255, the same as its COCO result
        saved = sorted(out.glob(f"x_{image_id + 1}_mask*.png"))
        assert any(mask_util.area(r["segmentation"]) for r in mine)
        for r, path in zip(mine, saved):
            assert path.name.endswith(f"_{r['class_name']}.png")
            assert np.array_equal(np.asarray(Image.open(path)), mask_util.decode(r["segmentation"]) * 255)


def test_output_names_are_distinct_and_follow_the_input_order():
    from pathlib import Path

    from maskrcnn.cli import output_names

    paths = [Path("a/x.png"), Path("b/x.jpg"), Path("c/y.png"), Path("x_1.png"), Path("d/X.png")]
    names = output_names(paths)
    assert names == ["x_2", "x_3", "y", "x_1", "X_4"]
    assert len({n.casefold() for n in names}) == len(paths)  # distinct on case-insensitive disks too
    assert output_names(paths) == names
    assert output_names([Path("a/x.png"), Path("a/y.png")]) == ["x", "y"]
    assert output_names([Path("a/x.png")] * 2) == ["x_1", "x_2"]


def test_predict_bf16_runs_where_the_cpu_has_bf16_and_is_refused_in_one_line_elsewhere(shapes, weights, tmp_path):
    from maskrcnn.precision import cpu_has_bf16

    result = run("predict", shapes / "data" / "val", "--weights", weights, "--out", tmp_path / "p",
                 "--score-threshold", 0.0, "--bf16", "--device", "cpu")
    if cpu_has_bf16():
        assert result[0] == 0, result[2]
        assert json.loads((tmp_path / "p" / "results.json").read_text())
    else:
        assert_user_error(*result, "bf16 needs a CPU with bfloat16 instructions")


def test_predict_errors(shapes, weights, tmp_path):
    assert_user_error(*run("predict", tmp_path / "none.png", "--weights", weights, "--out", tmp_path),
                      "no such file, folder or matching pattern")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert_user_error(*run("predict", bad, "--weights", weights, "--out", tmp_path), "cannot read this image")
    assert_user_error(*run("predict", bad, "--weights", tmp_path / "w.safetensors", "--out", tmp_path),
                      "no such file")
    cut = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[:-40])  # no end marker
    out = tmp_path / "out"
    assert_user_error(*run("predict", cut, "--weights", weights, "--out", out), "cannot read this image")
    assert not out.exists()  # refused before any output
    (tmp_path / "afile").write_text("")
    assert_user_error(*run("predict", shapes / "data" / "val", "--weights", weights, "--out", tmp_path / "afile"),
                      "afile: is a file, not a folder; pass another --out")
    code, _, err = run("predict", shapes / "data" / "val", "--weights", weights, "--out", out,
                       "--score-threshold", 2)
    assert code == 2 and "expects a number from 0 to 1, got '2'" in err


def test_mask_files_of_class_names_with_slashes_stay_in_the_output_folder(shapes, tmp_path):
    torch.manual_seed(0)
    cfg = replace_nested(small_cpu_model(3), **{"input.min_size_test": 128, "input.max_size": 192,
                                               "roi_heads.score_thresh": 0.0})
    weights = save_weights(tmp_path / "w.safetensors", build_model(cfg), class_names=["N/A", "a b", "c"])
    out = tmp_path / "pred"
    code, _, err = run("predict", shapes / "data" / "val", "--weights", weights, "--out", out,
                       "--score-threshold", 0.0, "--save-masks")
    assert code == 0, err
    names = {p.name.split("_", 2)[-1] for p in out.glob("*_mask*.png")}
    assert names <= {"N_A.png", "a_b.png", "c.png"} and names
    code, _, err = run("predict", shapes / "data" / "val", "--weights", weights, "--out", out,
                       "--score-threshold", 1.0, "--save-masks")
    assert code == 0, err
    assert not list(out.glob("*_mask*.png"))  # no instance now, and the earlier run's masks are gone


def test_eval_prints_the_ap_table_and_writes_results(shapes, weights, tmp_path):
    code, out, err = run("eval", shapes / "data" / "val.json", "--images", shapes / "data" / "val",
                         "--weights", weights, "--out", tmp_path / "ev")
    assert code == 0, err
    assert "mask" in out and (tmp_path / "ev" / "results.json").is_file()


def test_train_runs_a_tiny_config_and_prints_the_ap_table(shapes, tmp_path):
    data = shapes / "data"
    code, out, err = run("train", "small_cpu", f"data.train_json={data / 'train.json'}",
                         f"data.train_images={data / 'train'}", f"data.val_json={data / 'val.json'}",
                         f"data.val_images={data / 'val'}", "data.num_workers=0", "solver.ims_per_batch=2",
                         "solver.max_minutes=0", "solver.max_iter=2", "solver.warmup_iters=1", "model.input.min_size_train=[96]",
                         "model.input.min_size_test=96", "model.input.max_size=128",
                         f"output_dir={tmp_path / 'run'}")
    assert code == 0, err
    assert "trained 2 iterations" in out and "mask" in out and "category" in out
    assert (tmp_path / "run" / "model_final.safetensors").is_file()
    assert_user_error(*run("train", "small_cpu", f"data.train_json={data / 'train.json'}",
                           f"data.train_images={data / 'train'}", "solver.ims_per_batch=8"),
                      "lower solver.ims_per_batch")


def test_train_rejects_unknown_config_key(shapes):
    assert_user_error(*run("train", "small_cpu", "solver.learning_rate=0.1"), "unknown config key 'solver.learning_rate'")
    assert_user_error(*run("train", shapes / "missing.yaml"), "no such config file")
    assert_user_error(*run("train", "small_cpu", "device=gpu"),
                      "device: unknown device 'gpu'; expects one of auto, cpu, cuda, cuda:N")


def test_train_takes_options_before_and_between_overrides():
    assert_user_error(*run("train", "small_cpu", "--resume", "solver.max_iter=3", "solver.learning_rate=0.1"),
                      "unknown config key 'solver.learning_rate'")
    assert_user_error(*run("train", "small_cpu", "solver.max_iter=3", "--init-backbone", "r.pth", "solver.lr=0.1"),
                      "unknown config key 'solver.lr'")


def test_data_errors_name_the_record_and_the_field(shapes, tmp_path):
    """A data error's first line says what to do; the lines after it name each problem."""
    data = json.loads((shapes / "data" / "train.json").read_text())
    annotation = data["annotations"][0]
    annotation["bbox"][2] = -5
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps(data))
    images = f"data.train_images={shapes / 'data' / 'train'}"
    code, _, err = run("train", "small_cpu", f"data.train_json={bad}", images)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"maskrcnn train: error: 1 problem(s) in {bad}; fix them")
    assert len(lines) == 2 and lines[1].startswith(f"{bad}: annotation {annotation['id']} (image "
                                                   f"{annotation['image_id']}): bbox [")
    assert lines[1].endswith("has non-positive width; COCO bbox is [x, y, width, height]")
    code, _, err = run("train", "small_cpu", f"data.train_json={tmp_path / 'nope.json'}", images)
    assert code == 2 and err.strip().splitlines() == [
        f"maskrcnn train: error: {tmp_path / 'nope.json'} cannot be used as a COCO instances file:",
        f"{tmp_path / 'nope.json'}: file: no such file; check the path to the annotation JSON"]


@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "x"])
def test_demo_needs_a_time_budget_above_zero(minutes, capsys):
    """Parsed only: a budget of 0 would mean none, and the demo would train for hours."""
    from maskrcnn.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["demo", "--minutes", minutes])
    assert info.value.code == 2
    assert f"argument --minutes: expects a number of minutes above 0, got '{minutes}'" in capsys.readouterr().err
    assert build_parser().parse_args(["demo", "--minutes", "0.5"]).minutes == 0.5


def test_convert_from_torchvision_and_errors(tmp_path):
    tv = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    model = tv.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "tv.pth")
    code, out, err = run("convert", "--from", "torchvision", tmp_path / "tv.pth", tmp_path / "out.safetensors",
                         "--class-names", "a,b")
    assert code == 0, err
    from maskrcnn.api import load

    predictor = load(tmp_path / "out.safetensors", device="cpu")
    assert predictor.class_names == ["a", "b"] and predictor.model.num_classes == 2
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    assert_user_error(*run("convert", "--from", "torchvision", tmp_path / "other.pth", tmp_path / "x.safetensors"),
                      f"{tmp_path / 'other.pth'}: not a torchvision Mask R-CNN state dict")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module is never unpickled
    assert_user_error(*run("convert", "--from", "torchvision", tmp_path / "module.pth", tmp_path / "x.safetensors"),
                      f"{tmp_path / 'module.pth'}: not a state dict of tensors; save one with "
                      "torch.save(model.state_dict(), path)")
    faster = {k: v for k, v in model.state_dict().items() if "mask" not in k}  # a Faster R-CNN's keys
    torch.save(faster, tmp_path / "faster.pth")
    assert_user_error(*run("convert", "--from", "torchvision", tmp_path / "faster.pth", tmp_path / "x.safetensors"),
                      "not a torchvision maskrcnn_resnet50_fpn state dict: missing roi_heads.mask_head.convs.0.weight")
    assert not (tmp_path / "x.safetensors").exists()
    assert_user_error(*run("convert", "--from", "torchvision", tmp_path / "missing.pth", tmp_path / "x"),
                      "no such file")


@pytest.mark.parametrize("classes,ids,missing", [(2, None, "3, 7"), (3, [5, 6, 7], "1, 3")])
def test_weights_without_the_datas_categories_are_reported(shapes, tmp_path, classes, ids, missing):
    """The shapes set has categories 1, 3, 7: eval names those the weights lack and writes nothing."""
    other = save_weights(tmp_path / "other.safetensors", build_model(small_cpu_model(classes)), category_ids=ids)
    annotations = shapes / "data" / "val.json"
    assert_user_error(*run("eval", annotations, "--images", shapes / "data" / "val", "--weights", other,
                           "--out", tmp_path / "ev"),
                      f"{other} does not predict categories {missing} of {annotations} (it predicts "
                      f"{classes} categories, the data has 3); use weights trained on this data")
    assert not (tmp_path / "ev").exists()


def test_eval_labels_take_the_weights_category_ids(shapes, weights, tmp_path):
    """As torchvision's COCO weights label by COCO's own ids 1..90, a weight file's category ids,
    not the data set's order, say which category each label is."""
    from maskrcnn.weights import read_weights

    state, config, names, _ = read_weights(weights)
    model = build_model(config)
    model.load_state_dict(state)
    shuffled = save_weights(tmp_path / "shuffled.safetensors", model, class_names=names, category_ids=[3, 7, 1])
    data = [shapes / "data" / "val.json", "--images", shapes / "data" / "val"]
    for w, out in ((weights, "a"), (shuffled, "b")):
        code, _, err = run("eval", *data, "--weights", w, "--out", tmp_path / out)
        assert code == 0, err
    a, b = (json.loads((tmp_path / out / "results.json").read_text()) for out in "ab")
    assert len(a) == len(b) > 0
    assert [{1: 3, 3: 7, 7: 1}[r["category_id"]] for r in a] == [r["category_id"] for r in b]
    assert [r["bbox"] for r in a] == [r["bbox"] for r in b]


def test_python_api_predictor_and_overlay(shapes, weights):
    from PIL import Image

    from maskrcnn.api import load
    from maskrcnn.visualize import overlay

    predictor = load(weights, device="cpu", score_threshold=0.0)
    path = sorted((shapes / "data" / "val").glob("*.png"))[0]
    for image in (path, Image.open(path), __import__("numpy").asarray(Image.open(path))):
        inst = predictor(image)
        assert inst.masks.shape[1:] == Image.open(path).size[::-1]
        assert len(inst.class_names) == len(inst)
    picture = overlay(path, inst)
    assert picture.size == Image.open(path).size


@pytest.mark.slow
def test_demo_writes_every_artefact(tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = run("demo", "--out", out, "--minutes", 0.3, "--train", 8, "--val", 3)
    assert code == 0, err[-2000:]
    for name in ("metrics.json", "training_curves.png", "model.safetensors", "summary.txt"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == 3
    assert "segm" in json.loads((out / "metrics.json").read_text())
    assert str(out / "summary.txt") in stdout
