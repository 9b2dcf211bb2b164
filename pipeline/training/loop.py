"""The training loop of one run: set up, resume, iterate, validate, snapshot, finish.

Everything that decides a run's result is a function of (config, fold, seed, data) and of the
state saved in ``train/last.pt``: model, optimizer, scheduler, RNG states and the iteration.
Batches depend only on (seed, iteration) (see :mod:`pipeline.data.dataset`; with class-aware
``models.<name>.sampling`` too), so killing a run and re-running the same command continues
from the last checkpoint and, on the CPU with deterministic settings, ends with the same
weights as an uninterrupted run.

A run resumes only what it began (:mod:`pipeline.training.resume`): its checkpoints record the
config and the digests of the data it learns from (:mod:`pipeline.training.provenance`). When
any differs, the run starts over and says why in one line. ``models.<name>.batch_size`` is the
global batch of one forward: with DDP each of the ``world_size`` ranks takes
``batch_size / world_size`` images of it. An optimizer step accumulates the gradients of
``accum_steps`` forwards (a step of ``batch_size * accum_steps`` images); iterations, the
schedule, the intervals and the SWA phase count optimizer steps, and checkpoints fall between
steps, so resuming stays exact. Mixed precision (:mod:`pipeline.training.precision`) and the
EMA of the weights (:mod:`pipeline.training.ema`) keep their state in ``last.pt`` too.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from tqdm.auto import tqdm

from pipeline.core import atomic
from pipeline.core.curves import TRAIN, VAL
from pipeline.core.device import Dist
from pipeline.core.errors import PipelineError
from pipeline.core.runs import RunConfig, RunPaths
from pipeline.data.dataset import ClassDraw, SegmentationDataset, build_eval_loader, build_loader
from pipeline.data.manifest import ClassInfo
from pipeline.data.transforms import transform_from_params, val_scale
from pipeline.evaluation.metrics import iou_per_class, mean_iou, pixel_accuracy
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.predict import autocast, validate
from pipeline.training.distill import student_teacher_logits
from pipeline.training.ema import ema_state
from pipeline.training.logs import CurveLog
from pipeline.training.memory import check_memory
from pipeline.training.optim import swa_snapshot_iters
from pipeline.training.precision import backward, optimizer_step
from pipeline.training.resume import prepare_run_dir, resume
from pipeline.training.run_data import RunData
from pipeline.training.run_setup import Run, set_up


class NonFiniteLoss(PipelineError):
    """A step's loss was NaN or infinite on some rank: the run stops at its last checkpoint."""


def train_run(*, cfg: RunConfig, paths: RunPaths, fold: int | str, seed: int, data: RunData,
              device: torch.device, num_workers: int = 0, teacher: Path | None = None,
              dist: Dist = Dist(), deterministic: bool = True, weights_dir: str | Path | None = None,
              progress: bool = True) -> dict:
    """Train one run to completion (resuming from ``paths.last`` when its config and data
    digests are the same, else starting over).

    ``teacher``: a distillation teacher's checkpoint; one that has seen the student's
    validation frames is refused (:func:`pipeline.training.provenance.check_teacher`). Returns
    the run's metrics (also written to ``paths.metrics`` by rank 0): best and last validation
    mIoU, per-class IoU of the last weights, iterations and images/s. ``weights_dir``: offline
    hub weights for a config with ``weights: imagenet`` (:mod:`pipeline.models.pretrained`).
    """
    run = set_up(cfg=cfg, paths=paths, fold=fold, seed=seed, data=data, device=device,
                 teacher=teacher, dist=dist, deterministic=deterministic, weights_dir=weights_dir)
    start, resumed = resume(run)
    if start < cfg.total_iters:  # before anything is written: a batch that cannot fit is refused
        check_memory(run.model, cfg=cfg, frames=data.train_frames, device=device,
                     world_size=dist.world_size)
    if dist.is_main:
        prepare_run_dir(paths, start=start, fresh=not resumed)
    train_ds, val_ds = _datasets(cfg, data)
    net: nn.Module = run.model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)
    if start < cfg.total_iters:
        _iterate(run, net, train_ds, val_ds, start=start, resumed=resumed,
                 num_workers=num_workers, progress=progress)
    return _finish(run, validated=val_ds is not None)


def _datasets(cfg: RunConfig, data: RunData
              ) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """The run's training frames with its train transform, and its validation frames (None
    for fold "all") with the eval one."""
    m, classes = cfg.model, data.classes
    train_ds = SegmentationDataset(data.train_frames, classes=classes, transform=transform_from_params(
        m.augment, train=True, source=f"models.{cfg.name}.augment"))
    val_ds = SegmentationDataset(data.val_frames, classes=classes, transform=transform_from_params(
        m.augment, train=False, source=f"models.{cfg.name}.augment")) if data.val_frames else None
    return train_ds, val_ds


def _class_draw(cfg: RunConfig, data: RunData) -> ClassDraw | None:
    """The run's class-aware frame and crop draws over its training frames (None: uniform)."""
    s = cfg.sampling
    if s.uniform:
        return None
    return ClassDraw(data.train_counts, temperature=s.temperature, rare_frames=s.rare_frames,
                     crop_share=s.rare_crop_share)


def _iterate(run: Run, net: nn.Module, train_ds: SegmentationDataset,
             val_ds: SegmentationDataset | None, *, start: int, resumed: bool, num_workers: int,
             progress: bool) -> None:
    """Train from iteration ``start`` to the end, logging, snapshotting, validating and
    checkpointing on the config's intervals."""
    paths, dist, total = run.paths, run.dist, run.cfg.total_iters
    # one loader batch per forward: step i takes the forwards [i * accum, (i + 1) * accum)
    loader = build_loader(train_ds, batch_size=run.batch, num_workers=num_workers, seed=run.seed,
                          start_iter=start * run.cfg.model.accum_steps, rank=run.dist.rank,
                          world_size=run.dist.world_size, class_draw=_class_draw(run.cfg, run.data))
    bar = tqdm(total=total, initial=start, desc=paths.root.name, unit="it", dynamic_ncols=True,
               disable=(not progress or not dist.is_main) or None, mininterval=1.0)
    with contextlib.ExitStack() as stack:  # the curves are closed however the loop ends
        run.curves = stack.enter_context(CurveLog(paths.curves)) if dist.is_main else None
        _steps(run, net, loader, val_ds, bar, start=start, resumed=resumed)


def _steps(run: Run, net: nn.Module, loader, val_ds: SegmentationDataset | None, bar: tqdm, *,
           start: int, resumed: bool) -> None:
    """The iterations from ``start`` on (the body of :func:`_iterate`)."""
    cfg, paths, dist, m, swa = run.cfg, run.paths, run.dist, run.cfg.model, run.cfg.swa
    total = cfg.total_iters
    snapshot_at = set(swa_snapshot_iters(max_iters=m.iters, swa_iters=swa.iters, swa_cycle=swa.interval))
    ckpt_every = m.ckpt_interval or m.val_interval
    it = start
    saved_at = start if resumed else None
    batches = iter(loader)
    net.train()
    t0, seen = time.perf_counter(), 0
    while it < total:
        loss, parts, n_images = _accumulate(run, net, batches)
        if not _finite_on_every_rank(run, loss):
            bar.close()
            kept = f"{paths.last} (iteration {saved_at})" if saved_at is not None else "none yet"
            raise NonFiniteLoss(f"{paths.root.name}: loss is {loss.item()} at iteration {it}; "
                                f"stopped. Last good checkpoint: {kept}. Lower the lr or set "
                                f"grad_clip in models.{cfg.name}")
        lr = _update(run)
        it += 1
        seen += n_images * dist.world_size
        bar.update(1)

        if dist.is_main and (it % m.log_interval == 0 or it == total):
            _log_step(run, bar, it=it, lr=lr, loss=loss, parts=parts,
                      speed=seen / max(time.perf_counter() - t0, 1e-9))
        if dist.is_main and (it - 1) in snapshot_at:
            _save(run, paths.snapshot(it), iteration=it, full=False, metric=None)
        validate_now = val_ds is not None and (it % m.val_interval == 0 or it in (m.iters, total))
        if validate_now and dist.is_main:
            _validate(run, val_ds, bar, it=it)
        if it % ckpt_every == 0 or it in (m.iters, total):
            # kept in last.pt, so that re-running a finished run rewrites the same metrics
            run.state["images_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
            if dist.is_main:
                _save(run, paths.last, iteration=it, full=True, metric=run.state["last"])
                if run.ema is not None:
                    _save(run, paths.ema, iteration=it, full=False, metric=run.state.get("ema"),
                          model=run.ema.module)
            saved_at = it
            dist.barrier()
        elif validate_now:
            dist.barrier()
    bar.close()  # state["images_per_s"] was saved with the final checkpoint


def _forward(run: Run, net: nn.Module, batch: dict
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The loss of one batch, its named parts, and the rank's image count."""
    m, device = run.cfg.model, run.device
    images = batch["image"].to(device, non_blocking=True)
    masks = batch["mask"].to(device, non_blocking=True)
    if device.type == "cuda" and m.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, m.amp):
        logits, bare, teacher_logits = student_teacher_logits(net, run.teacher, images)
    loss, parts = run.loss_fn(logits.float(), masks, teacher_logits=teacher_logits,
                              student_logits=None if bare is None else bare.float())
    return loss, parts, images.shape[0]


def _accumulate(run: Run, net: nn.Module, batches) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Forward and backward ``accum_steps`` batches into fresh gradients: the mean of their
    losses (each backward takes its loss / ``accum_steps``, so that N batches of B images step
    as one batch of N * B for a loss that is a mean over images), its parts and the images."""
    accum, dist = run.cfg.model.accum_steps, run.dist
    run.optimizer.zero_grad(set_to_none=True)
    total, total_parts, images = None, {}, 0
    for i in range(accum):
        # DDP averages the gradients across ranks once, at the step's last backward
        with net.no_sync() if dist.enabled and i < accum - 1 else contextlib.nullcontext():
            loss, parts, n = _forward(run, net, next(batches))
            backward(loss / accum if accum > 1 else loss, run.scaler)
        total = loss.detach() if total is None else total + loss.detach()
        for k, v in parts.items():
            total_parts[k] = v.detach() if k not in total_parts else total_parts[k] + v.detach()
        images += n
    if accum > 1:
        total, total_parts = total / accum, {k: v / accum for k, v in total_parts.items()}
    return total, total_parts, images


def _finite_on_every_rank(run: Run, loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank: one rank's NaN stops them all together."""
    bad = torch.tensor(float(not torch.isfinite(loss)), device=run.device)
    if run.dist.enabled:
        torch_dist.all_reduce(bad)
    return not bad.item()


def _update(run: Run) -> float:
    """One optimizer and scheduler step on the accumulated gradients, then the EMA; returns the
    lr the step used. A step fp16's scaler skips (inf/NaN gradients) is counted in the state
    (``skipped_steps``); the schedule goes on, so that iterations stay optimizer steps."""
    applied = optimizer_step(run.optimizer, model=run.model, scaler=run.scaler,
                             grad_clip=run.cfg.model.grad_clip)
    if not applied:
        run.state["skipped_steps"] = run.state.get("skipped_steps", 0) + 1
    elif run.ema is not None:
        run.ema.update_parameters(run.model)
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    return lr


def _log_step(run: Run, bar: tqdm, *, it: int, lr: float, loss: torch.Tensor,
              parts: dict[str, torch.Tensor], speed: float) -> None:
    row = {"lr": lr, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
           "images_per_s": round(speed, 3)}
    if run.scaler is not None:  # fp16: steps skipped so far for inf/NaN gradients
        row["skipped_steps"] = run.state.get("skipped_steps", 0)
    run.curves.log(TRAIN, step=it, values=row)
    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")


def _save(run: Run, path: Path, *, iteration: int, full: bool, metric: dict | None,
          model: nn.Module | None = None) -> None:
    """A checkpoint of the run at ``iteration``: weights only (best, SWA snapshots, the EMA as
    ``model``) or ``full`` with what resuming needs (optimizer, scheduler, fp16's scaler, RNG
    states, the validation state, the EMA's state)."""
    extra = None
    if full:
        extra = {"state": run.state, **({"ema": ema_state(run.ema)} if run.ema is not None else {})}
    save_checkpoint(path, model=model or run.model, config=run.config,
                    classes=run.data.classes.to_json(), fold=run.fold, seed=run.seed,
                    iteration=iteration, metric=metric, optimizer=run.optimizer if full else None,
                    scheduler=run.scheduler if full else None,
                    scaler=run.scaler if full else None, rng_state=full, extra=extra)


def _scores(cm: np.ndarray, classes: ClassInfo) -> dict:
    ious = iou_per_class(cm)
    # the matrix travels in last.pt's metric: swa.py pools it over folds for SWA vs last
    return {"miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm),
            "per_class_iou": {n: (None if np.isnan(v) else float(v))
                              for n, v in zip(classes.names, ious)},
            "cm": np.asarray(cm, dtype=np.int64).tolist()}


def _validate(run: Run, val_ds: SegmentationDataset, bar: tqdm, *, it: int) -> None:
    """Score the weights of iteration ``it`` on the validation fold; a new best is saved."""
    m, classes, state, paths = run.cfg.model, run.data.classes, run.state, run.paths
    cm = validate(run.model, build_eval_loader(val_ds), num_classes=classes.num_classes,
                  device=run.device, amp=m.amp, ignore_index=classes.ignore_index,
                  scale=val_scale(m.augment))
    scores = _scores(cm, classes)
    state["last"] = {"iter": it, **scores}
    if state["best_miou"] is None or scores["miou"] > state["best_miou"]:
        state["best_miou"], state["best_iter"] = scores["miou"], it
        _save(run, paths.best, iteration=it, full=False,
              metric={"miou": scores["miou"], "iter": it})
    row = {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"]}
    if run.ema is not None:  # the average on the same frames, at the same iteration
        cm = validate(run.ema.module, build_eval_loader(val_ds), num_classes=classes.num_classes,
                      device=run.device, amp=m.amp, ignore_index=classes.ignore_index,
                      scale=val_scale(m.augment))
        state["ema"] = {"iter": it, **_scores(cm, classes)}
        row["ema_miou"] = state["ema"]["miou"]
    run.curves.log(VAL, step=it, values=row)
    bar.write(f"{paths.root.name} iter {it}: val mIoU {100 * scores['miou']:.2f} "
              f"(best {100 * state['best_miou']:.2f} @ {state['best_iter']})")


def _finish(run: Run, *, validated: bool) -> dict:
    """The run's metrics, written (with the last weights' per-class IoU) by rank 0."""
    paths, dist, state, data = run.paths, run.dist, run.state, run.data
    if not validated and dist.is_main and not paths.best.is_file():
        with atomic.atomic_path(paths.best) as tmp:  # no validation: the last weights are the best
            shutil.copyfile(paths.last, tmp)
    last = state["last"] or {}
    metrics = {"fold": run.fold, "seed": run.seed, "iterations": run.cfg.total_iters,
               "train_frames": len(data.train_frames), "val_frames": len(data.val_frames),
               "best_miou": state["best_miou"], "best_iter": state["best_iter"],
               "last_miou": last.get("miou"), "last_pixel_acc": last.get("pixel_acc"),
               "images_per_s": state.get("images_per_s"),
               "skipped_steps": state.get("skipped_steps", 0),
               "swa_snapshots": len(list(paths.snapshots.glob("swa_*.pt")))
               if paths.snapshots.is_dir() else 0}
    if run.ema is not None:  # the EMA's score at the last validation, beside last_miou's
        metrics["ema_miou"] = (state.get("ema") or {}).get("miou")
    if dist.is_main:
        atomic.write_json(paths.class_iou, {"iter": last.get("iter"),
                                            "per_class_iou": last.get("per_class_iou")})
        atomic.write_json(paths.metrics, metrics)
    dist.barrier()
    return metrics
