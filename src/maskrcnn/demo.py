"""The main job on the built-in data: make the shapes set, train the small CPU model, evaluate it,
and write overlays, metrics, curves, weights and a summary into one folder."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from maskrcnn.config import Config, DataConfig, preset_config


def demo_config(out: Path, minutes: float, device: str = "auto") -> Config:
    data = out / "data"
    config = preset_config("small_cpu")
    return replace(
        config, solver=replace(config.solver, max_minutes=minutes),
        data=DataConfig(train_json=str(data / "train.json"), train_images=str(data / "train"),
                        val_json=str(data / "val.json"), val_images=str(data / "val"), num_workers=1),
        output_dir=str(out / "train"), device=device)


def run_demo(out: Path, *, minutes: float = 7.0, n_train: int = 1000, n_val: int = 200,
             device: str = "auto", seed: int = 0) -> dict:
    """Everything the ``maskrcnn demo`` command does; returns the metrics."""
    from maskrcnn.api import Predictor
    from maskrcnn.data.shapes import make_shapes
    from maskrcnn.engine.trainer import train
    from maskrcnn.evaluation.coco_eval import format_table
    from maskrcnn.visualize import overlay, plot_training_curves
    from maskrcnn.weights import save_weights

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "train.json").is_file() or not (data / "val.json").is_file():
        print(f"generating the shapes data set ({n_train} train / {n_val} val images) in {data}/")
        make_shapes(data, n_train, n_val, seed)
    else:
        print(f"using the shapes data set already in {data}/ (delete it to generate it again)")
    config = demo_config(out, minutes, device)
    print(f"training the small CPU model for {minutes:g} minutes")
    result = train(config)
    model, metrics, val_set = result["model"], result["metrics"], result["val_set"]
    weights = save_weights(out / "model.safetensors", model, class_names=val_set.class_names,
                           category_ids=val_set.category_ids)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    curves = plot_training_curves(Path(config.output_dir) / "metrics.jsonl", out / "training_curves.png")
    predictor = Predictor(model, class_names=val_set.class_names, category_ids=val_set.category_ids,
                          score_threshold=0.5, device=str(next(model.parameters()).device))
    overlays = out / "overlays"
    overlays.mkdir(exist_ok=True)
    for i in range(min(8, len(val_set))):
        image, _ = val_set[i]
        overlay(image, predictor(image)).save(overlays / f"val_{i:02d}.png")
    table = format_table(metrics)
    summary = (f"maskrcnn demo: small CPU model (ResNet-18-FPN from scratch) on the built-in shapes set\n"
               f"training: {result['iterations']} iterations in {result['seconds'] / 60:.1f} min; "
               f"total demo time {(time.perf_counter() - t0) / 60:.1f} min\n\n{table}\n")
    (out / "summary.txt").write_text(summary)
    print(summary)
    print(f"overlays:        {overlays}/\nmetrics:         {out / 'metrics.json'}\n"
          f"training curves: {curves}\nweights:         {weights}\nsummary:         {out / 'summary.txt'}")
    return metrics
