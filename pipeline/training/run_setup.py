"""Set up one run: check its inputs, then build what it trains with, as its config describes.

:func:`set_up` refuses a batch that cannot be split and a teacher that has seen the student's
validation frames, seeds every RNG, then builds the model, its optimizer and schedule, the
teacher and the loss. The order is part of the run's result: each build draws from the seeded
RNGs in turn (a resumed run then restores the states saved in ``last.pt``). The :class:`Run`
it returns is what the steps of :mod:`pipeline.training.loop` share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipeline.core.device import Dist, seed_everything
from pipeline.core.errors import PipelineError
from pipeline.core.runs import RunConfig, RunPaths
from pipeline.models.build import build_model
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint, weights_digest
from pipeline.models.wrappers import to_channels_last
from pipeline.training.distill import build_run_loss
from pipeline.training.ema import build_ema
from pipeline.training.logs import CurveLog
from pipeline.training.memory import check_batch
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.precision import build_scaler
from pipeline.training.provenance import check_teacher, data_digests
from pipeline.training.run_data import RunData


@dataclass
class Run:
    """One run's inputs, what it trains with, and the state its checkpoints carry."""

    cfg: RunConfig
    paths: RunPaths
    fold: int | str
    seed: int
    data: RunData
    device: torch.device
    dist: Dist
    batch: int                       # images one rank draws per forward (accum_steps per step)
    model: nn.Module                 # the bare model: what checkpoints and validation see
    optimizer: torch.optim.Optimizer
    scheduler: Any
    teacher: nn.Module | None        # the distillation teacher, eval mode, frozen
    loss_fn: nn.Module
    config: dict                     # checkpoint_config: what a resumed last.pt must match
    # best and last validation scores (+ images/s): saved in last.pt, restored on resume
    state: dict = field(default_factory=lambda: {"best_miou": None, "best_iter": None,
                                                 "last": None})
    scaler: torch.amp.GradScaler | None = None  # fp16's gradient scaler (state in last.pt)
    ema: AveragedModel | None = None   # the EMA of the weights (state in last.pt)
    curves: CurveLog | None = None     # rank 0's DVCLive curves while the loop runs


def checkpoint_config(cfg: RunConfig, fold: int | str, seed: int, model_spec: dict,
                      digests: dict) -> dict:
    """The ``config`` every checkpoint of the run holds: the model spec that rebuilds it, the
    run config, fold, seed and the data digests of :mod:`pipeline.training.provenance`."""
    return {"model": model_spec, "run": cfg.to_dict(), "fold": fold, "seed": seed,
            "data": digests}


def _check_crop(model: nn.Module, crop, *, where: str) -> None:
    """Models that need input sides divisible by their output stride (smp's FPN, PSPNet, ...)
    get training crops as they are: refuse a crop they cannot take, before any work."""
    stride = getattr(getattr(model, "encoder", None), "output_stride", None)
    if not (getattr(model, "requires_divisible_input_shape", False) and stride and crop):
        return
    h, w = (int(v) for v in crop)
    if h % stride or w % stride:
        fit = [max(stride, v // stride * stride) for v in (h, w)]
        raise PipelineError(f"{where}: {[h, w]} must divide by {stride} for this architecture "
                            f"(its encoder's output stride); e.g. {fit}")


def set_up(*, cfg: RunConfig, paths: RunPaths, fold: int | str, seed: int, data: RunData,
           device: torch.device, teacher: Path | None, dist: Dist, deterministic: bool,
           weights_dir: str | Path | None = None) -> Run:
    """Check the run's batch and teacher, seed, and build its model (on ``device``), optimizer,
    scheduler, teacher model and loss, fp16's gradient scaler and the EMA of the weights (when
    the config asks for them); nothing is written."""
    m, classes = cfg.model, data.classes
    batch = check_batch(cfg, train_frames=len(data.train_frames), world_size=dist.world_size)
    digests, teacher_ckpt = data_digests(data), None
    if teacher is not None:
        teacher_ckpt = load_checkpoint(teacher)
        check_teacher(teacher_ckpt, teacher, student=cfg.name, fold=fold, digests=digests)
        digests["teacher"] = weights_digest(teacher_ckpt["model"])
    seed_everything(seed, deterministic=deterministic)
    la = cfg.logit_adjust
    logit_adjust = ({"tau": la.tau, "scale": la.scale, "prior": data.prior_counts.tolist(),
                     "keep_prior_at_eval": la.keep_prior_at_eval, "head": la.head}
                    if la.enabled else None)
    try:
        model = build_model(arch=m.arch, encoder=m.encoder, num_classes=classes.num_classes,
                            weights=m.weights or None, logit_adjust=logit_adjust,
                            weights_dir=weights_dir, **m.arch_kwargs)
    except PipelineError as err:  # name the config: "unknown arch" alone does not say where
        raise PipelineError(f"models.{cfg.name}: {err}") from None
    config = checkpoint_config(cfg, fold, seed, dict(model.model_config), digests)
    _check_crop(model, m.augment.get("crop"), where=f"models.{cfg.name}.augment.crop")
    model.to(device)
    if device.type == "cuda" and m.channels_last:
        model = to_channels_last(model)

    opt = cfg.optimizer
    optimizer = build_optimizer(model, name=opt.name, lr=opt.lr, weight_decay=opt.weight_decay,
                                head_lr_mult=opt.head_lr_mult, momentum=opt.momentum)
    sch, swa = cfg.schedule, cfg.swa
    scheduler = build_scheduler(optimizer, max_iters=m.iters, warmup_iters=sch.warmup_iters,
                                warmup_ratio=sch.warmup_ratio, power=sch.power,
                                min_lr_ratio=sch.min_lr_ratio, swa_iters=swa.iters,
                                swa_cycle=swa.interval, swa_max_ratio=swa.max_lr_ratio,
                                swa_min_ratio=swa.min_lr_ratio)
    teacher_model = None
    if teacher_ckpt is not None:
        teacher_model, _ = model_from_checkpoint(teacher_ckpt)
        teacher_model.to(device).eval().requires_grad_(False)
    loss_fn = build_run_loss(cfg, classes=classes, distill=teacher_model is not None)
    return Run(cfg=cfg, paths=paths, fold=fold, seed=seed, data=data, device=device, dist=dist,
               batch=batch, model=model, optimizer=optimizer, scheduler=scheduler,
               teacher=teacher_model, loss_fn=loss_fn, config=config,
               scaler=build_scaler(m.amp, device), ema=build_ema(model, cfg.ema.decay))
