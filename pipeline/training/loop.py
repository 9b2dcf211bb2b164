"""The training loop of one run: schedule, SWA snapshots, validation, logs, resume, DDP.

Everything that decides a run's result is a function of (config, fold, seed, data) and of the
state saved in ``train/last.pt``: model, optimizer, scheduler, RNG states and the iteration.
Batches depend only on (seed, iteration) (see :mod:`pipeline.data.dataset`), so killing a run
and re-running the same command continues from the last checkpoint and, on the CPU with
deterministic settings, ends with the same weights as an uninterrupted run.

A run resumes only what it began: its checkpoints record the config and digests of the data it
learns from (:func:`data_digests`: which frames train and validate, their contents, the class
table, the teacher's weights). When any differs, the run starts over and says why in one line.
``models.<name>.batch_size`` is the global batch of one optimizer step: with DDP each of the
``world_size`` ranks takes ``batch_size / world_size`` images of it.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from tqdm.auto import tqdm

from pipeline.core import atomic
from pipeline.models.checkpoint import (load_checkpoint, model_from_checkpoint, restore_training_state,
                                 save_checkpoint, weights_digest)
from pipeline.data.dataset import SegmentationDataset, build_eval_loader, build_loader
from pipeline.data.manifest import ClassInfo, Frame, frame_digest
from pipeline.data.transforms import transform_from_params, val_scale
from pipeline.core.errors import PipelineError
from pipeline.training.losses import build_loss
from pipeline.evaluation.metrics import iou_per_class, mean_iou, pixel_accuracy
from pipeline.models.build import build_model
from pipeline.models.wrappers import to_channels_last
from pipeline.models.prior import add_prior, without_prior
from pipeline.training.optim import build_optimizer, build_scheduler, swa_snapshot_iters
from pipeline.models.predict import autocast, validate
from pipeline.core.runs import RunConfig, RunPaths
from pipeline.core.device import Dist, seed_everything
from pipeline.core.names import ALL_FOLDS, run_name


# ----------------------------------------------------------------------------- run inputs
@dataclass
class RunData:
    """The frames a run trains and validates on, and the class prior of its training folds."""

    train_frames: list[Frame]
    val_frames: list[Frame]
    classes: ClassInfo
    prior_counts: np.ndarray  # int64 [C]: pixels per class over the training frames


def teacher_weights(teacher: str, *, runs_dir: Path, fold: int | str, seed: int) -> Path:
    """Resolve ``distill.teacher``: a config name (its run of the same fold), a run dir or a file.

    A run's SWA weights are used when present, else its best checkpoint.
    """
    path = Path(teacher)
    if path.suffix == ".pt":
        if not path.is_file():
            raise PipelineError(f"{path}: teacher checkpoint not found")
        return path
    run_dir = path if path.is_dir() else runs_dir / run_name(teacher, fold, seed)
    if not run_dir.is_dir():
        raise PipelineError(f"distill.teacher '{teacher}': run {run_dir} not found; train the "
                            f"teacher first (python pipeline/train.py --model {teacher} "
                            f"--fold {fold} --seed {seed})")
    return RunPaths(run_dir).final_weights()


def load_run_data(*, manifest: Path, classes_path: Path, counts_path: Path, folds_path: Path,
                  fold: int | str) -> RunData:
    """Frames of the training folds (all but ``fold``) and of ``fold``, and the training prior."""
    from pipeline.data.manifest import read_class_counts, read_classes, read_manifest
    from pipeline.data.splits import train_val_ids

    frames = {f.id: f for f in read_manifest(manifest, split="train")}
    train_ids, val_ids = train_val_ids(folds_path, fold)
    missing = [i for i in train_ids + val_ids if i not in frames]
    if missing:
        raise PipelineError(f"{folds_path}: {len(missing)} id(s) not in {manifest} (first: "
                            f"{missing[0]}); re-run `python pipeline/folds.py`")
    if not train_ids:
        raise PipelineError(f"{folds_path}: fold {fold} leaves no frame to train on")
    if fold != ALL_FOLDS and not val_ids:
        raise PipelineError(f"{folds_path}: fold {fold} has no frames")
    classes = read_classes(classes_path)
    ids, counts = read_class_counts(counts_path)
    row = {i: k for k, i in enumerate(ids)}
    rows = [row[i] for i in train_ids if i in row]
    prior = counts[rows].sum(axis=0) if rows else np.zeros(classes.num_classes, dtype=np.int64)
    if prior.sum() <= 0:  # would "train" to the end on a loss of 0 and write a best.pt
        raise PipelineError(f"{counts_path}: the {len(train_ids)} training frame(s) of --fold "
                            f"{fold} have no labelled pixel (all void): nothing to learn from; "
                            f"check their masks and the lookup table of {classes_path}")
    return RunData(train_frames=[frames[i] for i in train_ids],
                   val_frames=[frames[i] for i in val_ids], classes=classes, prior_counts=prior)


# ----------------------------------------------------------------------------- what a run learned from
def _sha1(lines: Iterable[str]) -> str:
    digest = hashlib.sha1()
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def _frames_digest(frames: Sequence[Frame]) -> str:
    # An older manifest has no digest column: hash the files themselves (slower, same value as
    # prepare's column), never path and size, which miss a mask redrawn in place.
    return _sha1(sorted(f"{f.id} {f.digest or frame_digest(f.image, f.mask)}" for f in frames))


def data_digests(data: RunData, *, teacher: str = "") -> dict[str, str]:
    """Digests (sha1 hex) of what a run learns from, stored in its checkpoints as
    ``config["data"]``: ``train_ids`` / ``val_ids`` (the fold assignment), ``train_frames`` /
    ``val_frames`` (ids with their image and mask contents, the manifest's ``digest``),
    ``classes`` (names, lookup table, ignore index: what maps masks to targets) and
    ``teacher`` (the distillation teacher's :func:`weights_digest`, "" without one)."""
    classes = data.classes
    return {
        "train_ids": _sha1(sorted(f.id for f in data.train_frames)),
        "val_ids": _sha1(sorted(f.id for f in data.val_frames)),
        "train_frames": _frames_digest(data.train_frames),
        "val_frames": _frames_digest(data.val_frames),
        "classes": _sha1([json.dumps({"names": list(classes.names),
                                      "lut": classes.lut_array().tolist(),
                                      "ignore_index": int(classes.ignore_index)})]),
        "teacher": teacher,
    }


# Why a run starts over, by digest; a content change is only named when the ids are the same.
DATA_CHANGES = {"train_ids": "training frames changed (fold assignment)",
                "val_ids": "validation frames changed (fold assignment)",
                "train_frames": "training frames changed (image or mask contents)",
                "val_frames": "validation frames changed (image or mask contents)",
                "classes": "classes changed (names, lookup table or ignore index)",
                "teacher": "teacher weights changed"}


def data_change(saved: dict | None, current: dict) -> str | None:
    """Why a checkpoint with data digests ``saved`` cannot be resumed on ``current``; None when
    it can."""
    if not isinstance(saved, dict):
        return "it records no data digests (saved by an older version)"
    changed = [k for k in DATA_CHANGES if saved.get(k) != current.get(k)]
    for ids, frames in (("train_ids", "train_frames"), ("val_ids", "val_frames")):
        if ids in changed and frames in changed:
            changed.remove(frames)
    return ", ".join(DATA_CHANGES[k] for k in changed) or None


def check_teacher(ckpt: dict, path: Path, *, student: str, fold: int | str,
                  digests: dict) -> None:
    """Refuse a teacher that has seen the student's validation frames: one of another fold, of
    every fold ("all"), or of the same fold number under another fold assignment. A student of
    fold "all" holds nothing out and may learn from any teacher."""
    if fold == ALL_FOLDS:
        return
    key = f"models.{student}.distill.teacher"
    theirs = ckpt.get("fold")
    shown = "an unrecorded fold" if theirs is None else f"fold {theirs}"
    if str(theirs) != str(fold):
        raise PipelineError(f"{key}: teacher {path} was trained with {shown} held out, but the "
                            f"student holds out fold {fold}: the teacher has seen the student's "
                            f"validation frames; use a teacher run of fold {fold}")
    saved = (ckpt.get("config") or {}).get("data") or {}
    if any(k in saved and saved[k] != digests[k] for k in ("train_ids", "val_ids")):
        raise PipelineError(f"{key}: teacher {path} was trained on fold {theirs} of another fold "
                            f"assignment (folds.csv changed since), so it may have seen the "
                            f"student's validation frames; train the teacher of fold {fold} again")


# ----------------------------------------------------------------------------- memory check
def available_memory(device: torch.device) -> int | None:
    """Bytes free for a run on ``device``: CUDA's free memory, else the host's available RAM
    (psutil when installed, /proc/meminfo, sysconf); None when nothing tells."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil  # optional: not a dependency of the package
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(model: nn.Module, hw: Sequence[int], *, probe_side: int = 64) -> float | None:
    """Bytes autograd keeps for the backward pass per training image of size ``hw``: measured
    on a CPU copy of ``model`` (2 images, train mode) at ``hw`` or, for a larger ``hw``, at
    ``probe_side`` squared, scaled by the pixel count. The model, its BatchNorm statistics and
    the RNG streams are left as they were. None when the copy cannot run at that size."""
    h, w = (int(v) for v in hw)
    ph, pw = (h, w) if h * w <= 4 * probe_side ** 2 else (probe_side, probe_side)
    probe = copy.deepcopy(model).cpu().train()
    params = {p.untyped_storage().data_ptr() for p in probe.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        with torch.random.fork_rng(devices=[]), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = probe(torch.zeros(2, 3, ph, pw))
    except Exception:  # an encoder with a fixed input size, ...: no estimate
        return None
    per_image = (sum(kept.values()) + 3 * out.float().nbytes) / 2  # + the losses' softmax etc.
    return per_image * (h * w) / (ph * pw)


def _train_hw(augment: dict, frames: Sequence[Frame]) -> tuple[int, int] | None:
    crop = augment.get("crop")
    if crop:
        return int(crop[0]), int(crop[1])
    sizes = [(f.height, f.width) for f in frames if f.height and f.width]
    if not sizes:
        return None
    scale = augment.get("scale") or 1.0
    scale = max(max(scale) if isinstance(scale, (list, tuple)) else float(scale), 1.0)
    return int(max(h for h, _ in sizes) * scale), int(max(w for _, w in sizes) * scale)


def check_memory(model: nn.Module, *, cfg: RunConfig, frames: Sequence[Frame],
                 device: torch.device, world_size: int = 1) -> None:
    """Refuse, naming ``models.<name>.batch_size``, a run whose rough memory need exceeds what
    the device has free: weights, gradients and optimizer state plus, per image of the rank's
    batch, the activations :func:`activation_bytes` measures (halved under bf16 autocast on
    CUDA). It leaves out the allocator's temporaries, so it errs low: a run it lets through may
    still run out, one it refuses cannot fit."""
    m = cfg.model
    hw = _train_hw(m.augment, frames)
    free = available_memory(device)
    if hw is None or not free:
        return
    if device.type == "cpu":  # processes of one CPU host share its memory
        free //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    per_image = activation_bytes(model, hw)
    if per_image is None:
        return
    if device.type == "cuda" and m.amp:
        per_image /= 2
    per_image += 3 * hw[0] * hw[1] * 4 + hw[0] * hw[1] * 8  # the batch itself: image, mask
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = 2 if cfg.optimizer.name == "adamw" else 1  # AdamW's two moments, SGD's momentum
    batch = m.batch_size // world_size
    need = weights * (2 + slots) + batch * per_image
    if need > free:
        raise PipelineError(
            f"models.{cfg.name}.batch_size: {batch} image(s) of {hw[0]}x{hw[1]} per step need "
            f"about {_size(need)} to train (a rough estimate, {_size(per_image)} per image), "
            f"more than the {_size(free)} free on {device}; lower "
            f"models.{cfg.name}.batch_size or models.{cfg.name}.augment.crop")


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_batch(cfg: RunConfig, *, train_frames: int, world_size: int = 1) -> int:
    """The batch one rank draws per step: ``models.<name>.batch_size`` is the global batch,
    split evenly across the ``world_size`` DDP ranks, and at most the training frames."""
    key, batch = f"models.{cfg.name}.batch_size", cfg.model.batch_size
    if batch > train_frames:
        raise PipelineError(f"{key} ({batch}) is larger than the {train_frames} training frames; "
                            f"lower it to at most {train_frames}")
    if batch % world_size:
        raise PipelineError(f"{key} ({batch}) is the global batch of a step and must divide by "
                            f"the {world_size} DDP processes")
    return batch // world_size


# ----------------------------------------------------------------------------- losses
def build_run_loss(cfg: RunConfig, *, classes: ClassInfo, distill: bool = False):
    """The run's :class:`pipeline.training.losses.CombinedLoss`: ``models.<name>.loss`` plus, for a
    student, the ``distill`` part with its ``weight``, ``temperature`` and ``labelled_only``."""
    specs = list(cfg.model.loss)
    if distill:
        d = cfg.distill
        specs.append({"name": "distill", "weight": d.weight, "temperature": d.temperature,
                      "labelled_only": d.labelled_only})
    return build_loss(specs, ignore_index=classes.ignore_index, crop_hw=cfg.model.augment.get("crop"),
                      where=f"models.{cfg.name}.loss")


def student_teacher_logits(net: nn.Module, teacher: nn.Module | None, images: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(logits, student_bare, teacher_logits)`` of ``images`` [N, 3, H, W]: the logits every
    training loss sees ([N, C, H, W], with the logit-adjustment prior in train mode) and, with a
    teacher, the pair distillation compares (else None, None).

    Distillation compares bare logits ``f(x)`` on both sides, without any prior bias. The
    teacher, in eval mode, drops its prior; the student in train mode adds ``tau*log(prior)``,
    so a KL on its plain output pulls ``f_student`` toward ``f_teacher - tau*log(prior)`` and
    the student ends up adjusted twice at test time. Bare rather than both with the prior
    because ``f`` is what is used at test time, and because the KL then weights classes by the
    balanced posteriors: with the prior on both sides the head classes' mass dominates the soft
    targets, undoing the balance logit adjustment trains for. The student's bare logits come
    from its one forward pass (the prior is added back for the other losses), so identical
    weights give a KL of exactly 0.
    """
    if teacher is None:
        return net(images), None, None
    with without_prior(net):
        bare = net(images)
    with torch.no_grad(), without_prior(teacher):
        teacher_logits = teacher(images)
    return add_prior(net, bare), bare, teacher_logits


# ----------------------------------------------------------------------------- CSV logs
def _append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_log(path: Path, *, upto: int) -> None:
    """Keep rows with iteration <= ``upto`` (a resumed run re-logs what came after)."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if len(r) == len(header) and r[0].isdigit() and int(r[0]) <= upto]
    with atomic.atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *kept])


# ----------------------------------------------------------------------------- the loop
class NonFiniteLoss(PipelineError):
    pass


def _ckpt_config(cfg: RunConfig, fold: int | str, seed: int, model_spec: dict,
                 digests: dict) -> dict:
    return {"model": model_spec, "run": cfg.to_dict(), "fold": fold, "seed": seed,
            "data": digests}


def _same(a: Any, b: Any) -> bool:
    """Equal configs, floats up to rounding (a stored prior is re-normalized on save)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _compatible(ckpt: dict, config: dict) -> bool:
    saved = ckpt.get("config") or {}
    return all(_same(saved.get(k), config[k]) for k in ("run", "fold", "seed", "model"))


def _scores(cm: np.ndarray, classes: ClassInfo) -> dict:
    ious = iou_per_class(cm)
    # the matrix travels in last.pt's metric: swa.py pools it over folds for SWA vs last
    return {"miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm),
            "per_class_iou": {n: (None if np.isnan(v) else float(v))
                              for n, v in zip(classes.names, ious)},
            "cm": np.asarray(cm, dtype=np.int64).tolist()}


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


def train_run(*, cfg: RunConfig, paths: RunPaths, fold: int | str, seed: int, data: RunData,
              device: torch.device, num_workers: int = 0, teacher: Path | None = None,
              dist: Dist = Dist(), deterministic: bool = True, progress: bool = True) -> dict:
    """Train one run to completion (resuming from ``paths.last`` when its config and data
    digests are the same, else starting over).

    ``teacher``: a distillation teacher's checkpoint; one that has seen the student's
    validation frames is refused (:func:`check_teacher`). Returns the run's metrics (also
    written to ``paths.metrics`` by rank 0): best and last validation mIoU, per-class IoU of
    the last weights, iterations and images/s.
    """
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
                            weights=m.weights or None, logit_adjust=logit_adjust, **m.arch_kwargs)
    except PipelineError as err:  # name the config: "unknown arch" alone does not say where
        raise PipelineError(f"models.{cfg.name}: {err}") from None
    config = _ckpt_config(cfg, fold, seed, dict(model.model_config), digests)
    crop = m.augment.get("crop")
    _check_crop(model, crop, where=f"models.{cfg.name}.augment.crop")
    model.to(device)
    cuda = device.type == "cuda"
    if cuda and m.channels_last:
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

    # ---- resume
    total = cfg.total_iters
    start, state = 0, {"best_miou": None, "best_iter": None, "last": None}
    resumed = False
    if paths.last.is_file():
        ckpt = load_checkpoint(paths.last)
        changed = (data_change((ckpt.get("config") or {}).get("data"), digests)
                   if _compatible(ckpt, config) else "saved with another config")
        if changed is None:
            start = restore_training_state(ckpt, model=model, optimizer=optimizer,
                                           scheduler=scheduler)
            state.update((ckpt.get("extra") or {}).get("state", {}))
            resumed = True
            if dist.is_main:
                print(f"resuming {paths.root.name} from iteration {start}/{total}", flush=True)
        elif dist.is_main:
            print(f"{paths.last}: {changed}; starting {paths.root.name} over", flush=True)
        dist.barrier()  # every rank has read last.pt before rank 0 may delete it
    if start < total:  # before anything is written: a batch that cannot fit is refused
        check_memory(model, cfg=cfg, frames=data.train_frames, device=device,
                     world_size=dist.world_size)
    if dist.is_main:
        if not resumed:  # a fresh start keeps nothing of an earlier run (other config, killed)
            shutil.rmtree(paths.train_dir, ignore_errors=True)
            for stale in (paths.log, paths.val_log, paths.metrics, paths.swa):
                stale.unlink(missing_ok=True)
        paths.train_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_tmp(paths.train_dir, recursive=True)  # saves cut short by a kill
        _truncate_log(paths.log, upto=start)
        _truncate_log(paths.val_log, upto=start)

    train_ds = SegmentationDataset(data.train_frames, classes=classes, transform=transform_from_params(
        m.augment, train=True, source=f"models.{cfg.name}.augment"))
    val_ds = SegmentationDataset(data.val_frames, classes=classes, transform=transform_from_params(
        m.augment, train=False, source=f"models.{cfg.name}.augment")) if data.val_frames else None

    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    snapshot_at = set(swa_snapshot_iters(max_iters=m.iters, swa_iters=swa.iters, swa_cycle=swa.interval))
    ckpt_every = m.ckpt_interval or m.val_interval

    def save(path: Path, *, full: bool, metric: dict | None) -> None:
        save_checkpoint(path, model=model, config=config, classes=classes.to_json(), fold=fold,
                        seed=seed, iteration=it, metric=metric,
                        optimizer=optimizer if full else None,
                        scheduler=scheduler if full else None, rng_state=full,
                        extra={"state": state} if full else None)

    it = start
    saved_at = start if resumed else None
    if it < total:
        loader = build_loader(train_ds, batch_size=batch, num_workers=num_workers, seed=seed,
                              start_iter=start, rank=dist.rank, world_size=dist.world_size)
        batches = iter(loader)
        bar = tqdm(total=total, initial=start, desc=paths.root.name, unit="it", dynamic_ncols=True,
                   disable=(not progress or not dist.is_main) or None, mininterval=1.0)
        net.train()
        t0, seen = time.perf_counter(), 0
        while it < total:
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            if cuda and m.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, m.amp):
                logits, bare, teacher_logits = student_teacher_logits(net, teacher_model, images)
            loss, parts = loss_fn(logits.float(), masks, teacher_logits=teacher_logits,
                                  student_logits=None if bare is None else bare.float())
            bad = torch.tensor(float(not torch.isfinite(loss)), device=device)
            if dist.enabled:
                torch_dist.all_reduce(bad)
            if bad.item():
                bar.close()
                kept = (f"{paths.last} (iteration {saved_at})" if saved_at is not None
                        else "none yet")
                raise NonFiniteLoss(f"{paths.root.name}: loss is {loss.item()} at iteration {it}; "
                                    f"stopped. Last good checkpoint: {kept}. Lower the lr or set "
                                    f"grad_clip in models.{cfg.name}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if m.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), m.grad_clip)
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            it += 1
            seen += images.shape[0] * dist.world_size
            bar.update(1)

            if dist.is_main and (it % m.log_interval == 0 or it == total):
                speed = seen / max(time.perf_counter() - t0, 1e-9)
                row = {"iter": it, "lr": f"{lr:.6g}", "loss": f"{loss.item():.5f}",
                       **{k: f"{v.item():.5f}" for k, v in parts.items()},
                       "images_per_s": f"{speed:.2f}"}
                _append_row(paths.log, row)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")

            if dist.is_main and (it - 1) in snapshot_at:
                save(paths.snapshot(it), full=False, metric=None)

            validate_now = val_ds is not None and (it % m.val_interval == 0 or it in (m.iters, total))
            if validate_now and dist.is_main:
                cm = validate(model, build_eval_loader(val_ds), num_classes=classes.num_classes,
                              device=device, amp=m.amp, ignore_index=classes.ignore_index,
                              scale=val_scale(m.augment))
                scores = _scores(cm, classes)
                state["last"] = {"iter": it, **scores}
                if state["best_miou"] is None or scores["miou"] > state["best_miou"]:
                    state["best_miou"], state["best_iter"] = scores["miou"], it
                    save(paths.best, full=False, metric={"miou": scores["miou"], "iter": it})
                _append_row(paths.val_log, {"iter": it, "miou": f"{scores['miou']:.5f}",
                                            "pixel_acc": f"{scores['pixel_acc']:.5f}"})
                bar.write(f"{paths.root.name} iter {it}: val mIoU {100 * scores['miou']:.2f} "
                          f"(best {100 * state['best_miou']:.2f} @ {state['best_iter']})")
            if it % ckpt_every == 0 or it in (m.iters, total):
                # kept in last.pt, so that re-running a finished run rewrites the same metrics
                state["images_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
                if dist.is_main:
                    save(paths.last, full=True, metric=state["last"])
                saved_at = it
                dist.barrier()
            elif validate_now:
                dist.barrier()
        bar.close()  # state["images_per_s"] was saved with the final checkpoint

    if val_ds is None and dist.is_main and not paths.best.is_file():
        with atomic.atomic_path(paths.best) as tmp:  # no validation: the last weights are the best
            shutil.copyfile(paths.last, tmp)
    last = state["last"] or {}
    metrics = {"fold": fold, "seed": seed, "iterations": total,
               "train_frames": len(data.train_frames), "val_frames": len(data.val_frames),
               "best_miou": state["best_miou"], "best_iter": state["best_iter"],
               "last_miou": last.get("miou"), "last_pixel_acc": last.get("pixel_acc"),
               "images_per_s": state.get("images_per_s"),
               "swa_snapshots": len(list(paths.snapshots.glob("swa_*.pt")))
               if paths.snapshots.is_dir() else 0}
    if dist.is_main:
        atomic.write_json(paths.class_iou, {"iter": last.get("iter"),
                                            "per_class_iou": last.get("per_class_iou")})
        atomic.write_json(paths.metrics, metrics)
    dist.barrier()
    return metrics
