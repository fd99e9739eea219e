"""make-shapes -> train the small CPU preset from its YAML -> evaluate -> files that pycocotools
and the weight loader read unchanged."""

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "small_cpu_shapes.yaml"


@pytest.mark.slow
def test_shapes_train_evaluate_and_reload(tmp_path):
    from maskrcnn.config_io import load_config
    from maskrcnn.data.shapes import make_shapes
    from maskrcnn.engine.checkpoint import last_checkpoint
    from maskrcnn.engine.trainer import train
    from maskrcnn.weights import read_weights

    data = tmp_path / "shapes"
    make_shapes(data, 8, 4, seed=0)
    config = load_config(CONFIG, [f"data.train_json={data / 'train.json'}", f"data.train_images={data / 'train'}",
                                  f"data.val_json={data / 'val.json'}", f"data.val_images={data / 'val'}",
                                  "data.num_workers=0", "solver.max_minutes=0", "solver.max_iter=3",
                                  "solver.warmup_iters=2", "solver.log_period=1", f"output_dir={tmp_path / 'run'}"])
    result = train(config, progress=False)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 3]
    assert {"lr", "time", "total_loss", "loss_mask"} <= rows[0].keys() and "segm" in rows[-1]
    metrics = result["metrics"]
    for kind in ("bbox", "segm"):
        assert set(metrics[kind]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert 0.0 <= metrics[kind]["AP"] <= 1.0
    assert set(metrics["per_category"]) == set(result["val_set"].class_names)
    detections = COCO(str(data / "val.json")).loadRes(str(run / "results.json"))
    val_ids = set(result["val_set"].category_ids)
    assert {a["category_id"] for a in detections.dataset["annotations"]} <= val_ids
    # The final weights and the last checkpoint's both load as weight files with their classes.
    for weights in (run / "model_final.safetensors", last_checkpoint(run / "checkpoints") / "model.safetensors"):
        state, model_config, names, ids = read_weights(weights)
        assert model_config == config.model and names == result["train_set"].class_names
        assert ids == result["train_set"].category_ids and state.keys() == result["model"].state_dict().keys()
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml") == config
