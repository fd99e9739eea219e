"""The training loop: SGD with warmup and a schedule, logging, periodic evaluation, atomic
checkpoints with exact resume, a stop on non-finite losses, and DistributedDataParallel."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from maskrcnn.config import Config
from maskrcnn.engine import distributed as dist
from maskrcnn.engine.checkpoint import NAME, load_checkpoint, save_checkpoint
from maskrcnn.engine.schedule import lr_at


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message says why and what to try."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights and biases, none on normalisation parameters."""
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, norm_types) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_finite(losses: dict[str, torch.Tensor], iteration: int) -> None:
    bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(
            f"iteration {iteration}: non-finite {', '.join(bad)}; training stopped and the last "
            "checkpoint was kept. Likely causes: a learning rate too high (lower solver.base_lr or "
            "lengthen solver.warmup_iters), bad boxes in the data (run `maskrcnn check-data`: "
            "[x, y, w, h] read as corners, zero-size boxes), or fp16 overflow (solver.amp=false)")


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


class _Log:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def train(config: Config, *, resume: bool = False, init_backbone: str | None = None,
          progress: bool = True, stop_at: int | None = None) -> dict:
    """Train ``config`` and return ``{"model", "metrics", "train_set", "val_set", "output_dir"}``.

    ``stop_at`` ends the run after that iteration without the final evaluation, as a kill would
    (used to test exact resume).
    """
    from tqdm import tqdm

    from maskrcnn.api import pick_device
    from maskrcnn.config_io import save_config
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.loader import build_train_loader
    from maskrcnn.evaluation.coco_eval import evaluate
    from maskrcnn.modeling.mask_rcnn import build_model
    from maskrcnn.weights import save_weights

    rank, world = dist.init()
    main = rank == 0
    device = pick_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    d, s = config.data, config.solver
    train_set = CocoDataset(d.train_json, d.train_images, drop_empty=d.drop_empty, skip_bad=d.skip_bad)
    if main and sum(train_set.skipped.values()):
        print(f"skipped bad records in {d.train_json}: {train_set.skipped_summary()}")
    val_set = CocoDataset(d.val_json, d.val_images, skip_bad=d.skip_bad) if d.val_json else None
    if config.model.roi_heads.num_classes != train_set.num_classes:
        config = replace(config, model=replace(config.model, roi_heads=replace(
            config.model.roi_heads, num_classes=train_set.num_classes)))
    if main:
        save_config(config, out / "config.yaml")

    model = build_model(config.model).to(device)
    if init_backbone:
        from maskrcnn.interop.torchvision import load_backbone_weights

        report = load_backbone_weights(model, init_backbone)
        if main:
            print(f"backbone from {init_backbone}: {report}")
    optimizer = torch.optim.SGD(param_groups(model, s.weight_decay), lr=s.base_lr, momentum=s.momentum)

    start, max_iter = 0, s.max_iter
    ckpt = out / NAME
    log = _Log(out / "metrics.jsonl", main)
    if resume and ckpt.is_file():
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        start, max_iter = state["iteration"], state["extra"].get("max_iter", max_iter)
        if main:
            print(f"resumed from {ckpt} at iteration {start}")
    elif (out / "metrics.jsonl").exists() and main:
        (out / "metrics.jsonl").unlink()
    time_budget = s.max_minutes * 60 if s.max_minutes > 0 and not (resume and start) else 0.0

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = build_train_loader(train_set, batch_size=s.ims_per_batch, num_workers=d.num_workers,
                                aspect_ratio_grouping=d.aspect_ratio_grouping, seed=config.seed,
                                start_iter=start, rank=rank, world_size=world, flip_prob=d.flip_prob)
    use_amp = s.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    net.train()
    bar = tqdm(total=max_iter, initial=start, disable=not (progress and main), desc="train",
               dynamic_ncols=True)
    t_start = time.perf_counter()
    it = start
    t_mark = t_start
    while it < max_iter:
        if time_budget:
            elapsed = time.perf_counter() - t_start
            if it == start + 5:
                t_mark = time.perf_counter()  # the first iterations are slower (allocations, caches)
            elif it > start + 5 and (it - start) % 25 == 0:
                # Size the schedule to the budget from the measured speed, again as it drifts;
                # checkpoints store it, so a resumed run follows the same schedule.
                per_iter = (time.perf_counter() - t_mark) / (it - start - 5)
                max_iter = max(it + 1, it + int((time_budget - elapsed) / per_iter))
                bar.total = max_iter
            if elapsed >= time_budget:
                break
        lr = lr_at(it, s, max_iter)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = next(loader)
        images = [im.to(device, non_blocking=True) for im in images]
        with torch.autocast(device.type, enabled=use_amp):
            losses = net(images, _to_device(targets, device))
        check_finite(losses, it)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if s.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        it += 1
        bar.update(1)
        if it % s.log_period == 0 or it == max_iter:
            values = dist.mean_losses(losses, world)
            row = {"iteration": it, "lr": lr, **values, "total_loss": sum(values.values()),
                   "time": round(time.perf_counter() - t_start, 2)}
            log.write(row)
            bar.set_postfix(loss=f"{row['total_loss']:.3f}", mask=f"{values['loss_mask']:.3f}")
        if main and s.checkpoint_period and it % s.checkpoint_period == 0:
            save_checkpoint(out, model=model, optimizer=optimizer, iteration=it, extra={"max_iter": max_iter})
        if main and val_set is not None and s.eval_period and it % s.eval_period == 0 and it < max_iter:
            log.write({"iteration": it, **_metrics_row(evaluate(model, val_set, device=device,
                                                                progress=False))})
            net.train()
        if stop_at is not None and it >= stop_at:
            bar.close()
            return {"model": model, "metrics": None, "train_set": train_set, "val_set": val_set,
                    "output_dir": out}
    bar.close()
    metrics = None
    if main:
        save_checkpoint(out, model=model, optimizer=optimizer, iteration=it, extra={"max_iter": max_iter})
        save_weights(out / "model_final.safetensors", model, class_names=train_set.class_names,
                     category_ids=train_set.category_ids)
        if val_set is not None:
            metrics = evaluate(model, val_set, device=device, out_json=out / "results.json",
                               progress=progress)
            log.write({"iteration": it, **_metrics_row(metrics)})
    dist.barrier(world)
    return {"model": model, "metrics": metrics, "train_set": train_set, "val_set": val_set,
            "output_dir": out, "iterations": it, "seconds": time.perf_counter() - t_start}


def _metrics_row(metrics: dict) -> dict:
    return {"bbox": metrics["bbox"], "segm": metrics["segm"]}
