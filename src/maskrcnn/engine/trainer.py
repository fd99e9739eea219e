"""The training loop: SGD with warmup and a schedule, logging, periodic evaluation, atomic
checkpoints with exact resume, a stop on non-finite losses, and DistributedDataParallel.

Files in ``config.output_dir``: ``config.yaml`` (the config actually used), ``metrics.jsonl``
(one JSON object per ``log_period`` iterations and per evaluation), ``checkpoints/``
(see :mod:`maskrcnn.engine.checkpoint`), and at the end ``model_final.safetensors`` and,
with a validation set, ``results.json`` (COCO results of the final model).

Every random draw of iteration ``it`` (anchor and RoI sampling inside the model) comes from
generators seeded with ``(seed, rank, it)``, just as the data stream is a function of
``(seed, it)``. So a run resumed from a checkpoint, in any number of processes, repeats exactly
what the uninterrupted run would have done, and evaluating in between changes nothing.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import nn

from maskrcnn.api import pick_device
from maskrcnn.config import Config, ConfigError, to_dict
from maskrcnn.engine import distributed as dist
from maskrcnn.engine.checkpoint import last_checkpoint, load_checkpoint, read_checkpoint_info, save_checkpoint
from maskrcnn.engine.optimizer import build_optimizer, dense_layout, param_groups
from maskrcnn.engine.schedule import lr_at
from maskrcnn.ops.training_conv import use_training_convs

if TYPE_CHECKING:
    from maskrcnn.modeling.mask_rcnn import MaskRCNN

Callback = Callable[[int, dict], None]


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message says why and what to try."""


def check_finite(losses: dict, iteration: int, checkpoint: str | Path | None = None) -> None:
    """Raise :class:`TrainingError` naming the iteration, the non-finite terms and likely causes.

    >>> try:
    ...     check_finite({"loss_mask": 0.3, "loss_box_reg": float("nan")}, 12)
    ... except TrainingError as exc:
    ...     print(str(exc)[:43])
    iteration 12: non-finite loss_box_reg (nan)
    """
    bad = {k: float(v) for k, v in losses.items() if not math.isfinite(float(v))}
    if bad:
        kept = f"the last checkpoint ({checkpoint}) is kept" if checkpoint else "no checkpoint was written yet"
        raise TrainingError(
            f"iteration {iteration}: non-finite {', '.join(f'{k} ({v})' for k, v in bad.items())}; "
            f"training stopped and {kept}. Likely causes: a learning rate too high (lower "
            "solver.base_lr or lengthen solver.warmup_iters), bad boxes in the data ([x, y, w, h] "
            "passed as [x1, y1, x2, y2], zero-size boxes; run `maskrcnn check-data`), or fp16 "
            "overflow under AMP (solver.amp=false); solver.clip_grad_norm may also help")


class TimeBudget:
    """Chooses ``max_iter`` so that training ends when ``seconds`` of wall time are spent.

    The speed is measured after ``WARMUP`` iterations (the first ones are slow: allocations,
    caches) and re-measured every ``EVERY`` iterations, so the schedule (a cosine, say) ends
    near the deadline even if the speed drifts. ``spent`` is time already used by a run
    being resumed. ``update`` returns ``it`` itself once the time is up.

    >>> clock = iter(range(0, 1000, 2)).__next__  # a fake clock, 2 s later at every call
    >>> budget, max_iter = TimeBudget(100, start_iter=0, cap=10**6, clock=clock), 10**6
    >>> for it in range(26):  # one call per iteration: 2 s/iteration, 52 s used at it=25
    ...     max_iter = budget.update(it, max_iter)
    >>> max_iter  # 25 + 48 s / 2 s
    49
    """

    WARMUP, EVERY = 5, 25

    def __init__(self, seconds: float, *, start_iter: int, cap: int, spent: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.seconds, self.start, self.cap, self.spent, self.clock = seconds, start_iter, cap, spent, clock
        self.t0 = clock()
        self.mark: tuple[int, float] | None = None

    def elapsed(self) -> float:
        return self.spent + self.clock() - self.t0

    def update(self, it: int, max_iter: int) -> int:
        now = self.clock()
        remaining = self.seconds - (self.spent + now - self.t0)
        if remaining <= 0:
            return it
        n = it - self.start
        if self.mark is None and n >= self.WARMUP:
            self.mark = (it, now)
        elif self.mark is not None and n % self.EVERY == 0 and it > self.mark[0]:
            per_iter = (now - self.mark[1]) / (it - self.mark[0])
            max_iter = min(self.cap, it + max(1, int(remaining / per_iter)))
        return max_iter


def train(config: Config, *, resume: bool = False, init_backbone: str | Path | None = None,
          progress: bool = True, callbacks: Sequence[Callback] = ()) -> dict:
    """Train Mask R-CNN as ``config`` says; returns ``{"model", "metrics", "iterations",
    "seconds", "train_set", "val_set", "output_dir"}`` (``metrics``: final COCO AP or None).

    ``resume`` continues from ``output_dir/checkpoints`` exactly where it stopped (the same
    batches, random draws and learning rates as an uninterrupted run); a larger
    ``solver.max_iter``, or ``solver.max_minutes`` for a run bounded by wall time, then extends
    the run, and ``metrics.jsonl`` keeps its rows up to the checkpoint's iteration. The
    optimizer's state carries over and the solver settings are the config's (the ones that
    changed are printed); another ``solver.optimizer`` is refused. A run
    that starts at iteration 0 in a used ``output_dir`` (without ``resume``, or with it but no
    checkpoint there) empties ``metrics.jsonl`` and overwrites ``config.yaml`` and, at the end,
    ``model_final.safetensors`` and ``results.json``. Without ``resume``, an earlier run's
    ``checkpoints`` folder (if it holds a checkpoint) is renamed to ``checkpoints.previous``,
    deleting any ``checkpoints.previous`` already there, so only the latest earlier run's
    checkpoints are kept. ``init_backbone`` is an ImageNet ResNet state dict (torchvision
    ``.pth`` or ``.safetensors``), used on a fresh start.
    Each callback is called as ``callback(iteration, losses)`` after every iteration, in every
    process, with the losses averaged over processes; an exception from it ends training as a
    kill would (nothing more is written). Launched by ``torchrun`` with several processes, each
    takes ``ims_per_batch / world_size`` images and only rank 0 writes files.

    >>> from maskrcnn.config_io import load_config
    >>> result = train(load_config("configs/small_cpu_shapes.yaml"))  # doctest: +SKIP
    >>> result["metrics"]["segm"]["AP"]  # doctest: +SKIP
    """
    return _Trainer(config, resume=resume, init_backbone=init_backbone, progress=progress,
                    callbacks=callbacks).run()


def seed_everything(*keys: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators from ``keys``.

    >>> seed_everything(0, 1, 2); a = torch.rand(1); seed_everything(0, 1, 2); bool(a == torch.rand(1))
    True
    """
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_training_kernels(model: MaskRCNN) -> MaskRCNN:
    """What the trainer does to a model it trains on the CPU: channels-last weights and
    activations (oneDNN's layout: no reorders around each conv) and ``TrainingConv2d``'s 3x3
    convolutions (Winograd on large maps with many channels, weight gradients by Winograd's
    transforms or matrix products where oneDNN's are slow), the RPN conv's gradients taken only
    at the pixels of the sampled anchors. The same sums, rounded as Winograd's or in another
    order."""
    use_training_convs(model)
    model.rpn.head.conv.sparse_grad = True  # the RPN's losses see only the sampled anchors
    return model.use_channels_last()


class _Trainer:
    """The state of one training run; :func:`train` is its public face."""

    def __init__(self, config: Config, *, resume: bool, init_backbone, progress: bool,
                 callbacks: Sequence[Callback]):
        device = pick_device(config.device)
        self.rank, self.world = dist.init_from_env(device.type)
        if config.solver.ims_per_batch % self.world:
            raise ConfigError(f"solver.ims_per_batch={config.solver.ims_per_batch} (the total batch) is "
                              f"not divisible by the {self.world} processes")
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank())
        self.device, self.main = device, self.rank == 0
        self.progress, self.callbacks = progress, list(callbacks)
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        seed_everything(config.seed)  # the same initial weights in every process
        self.config = self._load_data(config)
        self._build_model(init_backbone if not (resume and last_checkpoint(self.ckpt_dir)) else None)
        self._prepare_state(resume)
        from maskrcnn.data.loader import build_train_loader

        s, d = self.config.solver, self.config.data
        self.loader = build_train_loader(
            self.train_set, batch_size=s.ims_per_batch // self.world, num_workers=d.num_workers,
            aspect_ratio_grouping=d.aspect_ratio_grouping, seed=self.config.seed, start_iter=self.start,
            rank=self.rank, world_size=self.world, flip_prob=d.flip_prob)

    # ------------------------------------------------------------------------------ setup

    def _load_data(self, config: Config) -> Config:
        from maskrcnn.data.coco import CocoDataset
        from maskrcnn.data.validate import DataError

        d = config.data
        if not d.train_json or not d.train_images:
            raise ConfigError("data.train_json and data.train_images must name a COCO-format "
                              "training set (e.g. data.train_json=data/shapes/train.json)")
        self.train_set = CocoDataset(d.train_json, d.train_images, drop_empty=d.drop_empty, skip_bad=d.skip_bad)
        if len(self.train_set) < config.solver.ims_per_batch:
            raise ConfigError(f"{d.train_json} has {len(self.train_set)} usable training images, fewer than "
                              f"one batch (solver.ims_per_batch={config.solver.ims_per_batch}); lower "
                              "solver.ims_per_batch or add images")
        if self.main and sum(self.train_set.skipped.values()):
            print(f"skipped records in {d.train_json}: {self.train_set.skipped_summary()}")
        self.val_set = CocoDataset(d.val_json, d.val_images, skip_bad=d.skip_bad) if d.val_json else None
        if self.val_set is not None and self.val_set.category_ids != self.train_set.category_ids:
            raise DataError(f"{d.val_json} has category ids {self.val_set.category_ids} but {d.train_json} "
                            f"has {self.train_set.category_ids}; both must list the same categories")
        k = self.train_set.num_classes
        if config.model.roi_heads.num_classes != k:
            if self.main:
                print(f"model.roi_heads.num_classes={config.model.roi_heads.num_classes} but "
                      f"{d.train_json} has {k} categories: training {k} classes")
            config = replace(config, model=replace(config.model, roi_heads=replace(
                config.model.roi_heads, num_classes=k)))
        return config

    def _build_model(self, init_backbone) -> None:
        from maskrcnn.modeling.mask_rcnn import build_model

        s = self.config.solver
        self.model = build_model(self.config.model).to(self.device)
        if self.device.type == "cpu":
            cpu_training_kernels(self.model)
        try:
            self.model.use_bf16(s.bf16)
        except ValueError as e:
            raise ConfigError(f"solver.bf16: {e}") from None
        if init_backbone:
            from maskrcnn.interop.torchvision import load_backbone_weights

            try:
                report = load_backbone_weights(self.model, init_backbone)  # torch.load(weights_only=True)
            except ValueError as e:
                raise ConfigError(f"init_backbone: {e}") from None
            if self.main:
                print(f"backbone weights from {init_backbone}: {report}")
        self.optimizer = build_optimizer(s, param_groups(self.model, s.weight_decay))
        self.use_amp = s.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.net = self.model
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _prepare_state(self, resume: bool) -> None:
        s = self.config.solver
        self.start, self.max_iter, spent = 0, s.max_iter, 0.0
        self.metrics: dict | None = None
        found = last_checkpoint(self.ckpt_dir)
        if resume and found is not None:
            changed = self._solver_changes(read_checkpoint_info(found)["extra"].get("config", {}))
            settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            info = load_checkpoint(self.ckpt_dir, model=self.model, optimizer=self.optimizer,
                                   scaler=self.scaler)
            for group, current in zip(self.optimizer.param_groups, settings):
                group.update(current)  # the state carries over; the settings are this config's
            self.start = info["iteration"]
            self.metrics = info["extra"].get("metrics")  # the AP the next checkpoints record
            spent = info["extra"].get("elapsed", 0.0)
            saved_max_iter = info["extra"].get("max_iter", s.max_iter)
            if s.max_minutes > 0 and saved_max_iter > self.start:
                # a run stopped before its end goes on along its own schedule; one that ended (at
                # its deadline or its cap) is extended by a larger budget, re-sized as it runs
                self.max_iter = min(saved_max_iter, s.max_iter)
            if self.main:
                print(f"resumed from {info['path']} at iteration {self.start}")
                if changed:
                    print(f"solver settings changed since that run, in use from now on: {changed}")
        elif self.main:
            if resume:
                print(f"no checkpoint in {self.ckpt_dir}: starting from iteration 0")
            elif found is not None:
                previous = self.out / "checkpoints.previous"
                replaced = previous.exists()
                if replaced:
                    shutil.rmtree(previous)
                os.replace(self.ckpt_dir, previous)
                print(f"{self.out} held an earlier run: its checkpoints moved to {previous}"
                      f"{' (replacing the ones there)' if replaced else ''} and metrics.jsonl starts "
                      "afresh (pass resume=True / --resume to continue a run instead)")
        self.saved_at = self.start if self.start else None
        self.budget = TimeBudget(s.max_minutes * 60, start_iter=self.start, cap=s.max_iter, spent=spent) \
            if s.max_minutes > 0 else None
        self.t0, self.spent = time.perf_counter(), spent
        if self.main:
            from maskrcnn.config_io import save_config

            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.out / "config.yaml")
            _truncate_log(self.out / "metrics.jsonl", self.start)

    def _solver_changes(self, saved: dict) -> str:
        """The solver settings of this config that differ from ``saved`` (the config a checkpoint
        records), as "name old -> new, ..."; refuses a change of optimizer, whose saved state
        (momentum buffers, or Adam's moments) the other one cannot use."""
        before, now = saved.get("solver", {}), to_dict(self.config.solver)
        if before.get("optimizer", now["optimizer"]) != now["optimizer"]:
            raise ConfigError(f"solver.optimizer={now['optimizer']}, but the checkpoint in {self.ckpt_dir} was "
                              f"trained with solver.optimizer={before['optimizer']}, whose state does not "
                              "carry over; resume with that optimizer, or start afresh without resume")
        return ", ".join(f"{k} {before[k]} -> {v}" for k, v in now.items() if k in before and before[k] != v)

    # ------------------------------------------------------------------------------- loop

    def run(self) -> dict:
        from tqdm import tqdm

        s = self.config.solver
        self.bar = tqdm(total=self.max_iter, initial=self.start, desc="train", dynamic_ncols=True,
                        disable=not (self.progress and self.main))
        it, losses = self.start, None
        while True:
            self._resize(it)
            if it >= self.max_iter:
                break
            losses = self._step(it)
            it += 1
            self.bar.update(1)
            if it % s.log_period == 0:
                self._log(it, losses)
            # evaluated before the checkpoint of the same iteration, so that a kill during the
            # evaluation resumes before it, and the checkpoint records its AP
            if s.eval_period and it % s.eval_period == 0 and it < self.max_iter:
                self._evaluate(it)
            if s.checkpoint_period and it % s.checkpoint_period == 0:
                self._save(it)
            for callback in self.callbacks:
                callback(it, losses)
        self.bar.close()
        if losses is not None and it % s.log_period:
            self._log(it, losses)
        if self.saved_at != it:
            self._save(it)
        self._finish(it)
        return {"model": self.model, "metrics": self.metrics, "iterations": it, "seconds": self._elapsed(),
                "train_set": self.train_set, "val_set": self.val_set, "output_dir": self.out}

    def _resize(self, it: int) -> None:
        """Time-budgeted runs: let rank 0's clock set ``max_iter`` on every process."""
        if self.budget is None:
            return
        if self.world > 1 and (it - self.start) % TimeBudget.EVERY:
            return  # one broadcast every EVERY iterations keeps the processes in step cheaply
        self.max_iter = dist.broadcast_int(self.budget.update(it, self.max_iter))
        self.bar.total = self.max_iter

    def _step(self, it: int) -> dict[str, float]:
        s = self.config.solver
        seed_everything(self.config.seed, self.rank, it)
        lr = lr_at(it, s, self.max_iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, targets = next(self.loader)
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                   for t in targets]
        with torch.autocast(self.device.type, enabled=self.use_amp):
            losses = self.net(images, targets)
        values = dist.mean_losses(losses)
        check_finite(values, it + 1, last_checkpoint(self.ckpt_dir) if self.saved_at is not None else None)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(sum(losses.values())).backward()
        if s.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad_norm)
        with dense_layout(self.optimizer):  # the fused kernel's layout; the same update
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr = lr
        return values

    # ----------------------------------------------------------------- logging and files

    def _elapsed(self) -> float:
        return self.spent + time.perf_counter() - self.t0

    def _log(self, it: int, losses: dict[str, float]) -> None:
        total = sum(losses.values())
        self.bar.set_postfix(loss=f"{total:.3f}", mask=f"{losses.get('loss_mask', 0.0):.3f}", refresh=False)
        self._write_row({"iteration": it, "lr": self.lr, **losses, "total_loss": total,
                         "time": round(self._elapsed(), 2)})

    def _write_row(self, row: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _save(self, it: int) -> None:
        # Checked in every process (the replicas are identical), so all of them stop together.
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(f"iteration {it}: the weights became non-finite ({bad[0]} and "
                                f"{len(bad) - 1} more) although the loss was finite: gradients exploded. "
                                "No checkpoint was written; lower solver.base_lr or set solver.clip_grad_norm")
        self.saved_at = it
        if not self.main:
            return
        extra = {"max_iter": self.max_iter, "elapsed": self._elapsed(), "config": to_dict(self.config),
                 "metrics": _summary(self.metrics)}
        save_checkpoint(self.ckpt_dir, model=self.model, optimizer=self.optimizer, iteration=it,
                        scaler=self.scaler, extra=extra, model_metadata=self._weights_metadata())

    def _weights_metadata(self) -> dict[str, str]:
        """The metadata of :func:`maskrcnn.weights.save_weights`, so a checkpoint's
        ``model.safetensors`` loads with ``maskrcnn.load`` and ``maskrcnn predict``."""
        from maskrcnn.weights import weights_metadata

        return weights_metadata(self.config.model, self.train_set.class_names, self.train_set.category_ids)

    def _evaluate(self, it: int, out_json: Path | None = None) -> None:
        """Rank 0 scores the model on the validation set and appends the AP to the log."""
        if not self.main or self.val_set is None:
            return
        from maskrcnn.evaluation.coco_eval import evaluate

        self.metrics = evaluate(self.model, self.val_set, device=self.device, out_json=out_json,
                                progress=self.progress and out_json is not None)
        self.model.train()
        self._write_row({"iteration": it, **self.metrics})

    def _finish(self, it: int) -> None:
        if self.main:
            from maskrcnn.weights import save_weights

            save_weights(self.out / "model_final.safetensors", self.model,
                         class_names=self.train_set.class_names, category_ids=self.train_set.category_ids)
            self._evaluate(it, out_json=self.out / "results.json")
        dist.barrier()


def _summary(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: metrics[k] for k in ("bbox", "segm") if k in metrics}


def _truncate_log(path: Path, iteration: int) -> None:
    """Keep the rows up to ``iteration`` (those a resumed run will not write again)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if iteration and _row_iteration(line) <= iteration]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(row + "\n" for row in rows))
    os.replace(tmp, path)


def _row_iteration(line: str) -> float:
    """The iteration of a log row; infinite for a line that is not a row (torn by a kill)."""
    try:
        return json.loads(line).get("iteration", 0)
    except (ValueError, AttributeError):
        return math.inf
