"""Stochastic weight averaging: the mean of a run's snapshots, then fresh BatchNorm statistics.

SWA (Izmailov et al., 2018) averages the weights saved at the end of each low-lr cycle
(``train/snapshots/swa_<iter>.pt``). Averaged weights do not match the BatchNorm running
statistics of any snapshot, so BN layers get theirs re-estimated with one pass over the run's
training frames (``torch.optim.swa_utils.update_bn``); models normalized only with LayerNorm or
GroupNorm keep no running statistics and skip that pass.

Averaging streams: one checkpoint is in memory at a time besides a float64 running sum of the
floating tensors. float64 keeps the sum of float32 weights exact for any practical number of
snapshots, so N identical snapshots average to exactly themselves and the result is the
correctly rounded mean. Integer buffers (BN ``num_batches_tracked``) are taken from the last.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn
from tqdm.auto import tqdm

from pipeline.core.atomic import write_json
from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS
from pipeline.core.runs import RunPaths
from pipeline.data.dataset import SegmentationDataset, build_eval_loader, build_loader
from pipeline.data.manifest import ClassInfo, Frame
from pipeline.data.transforms import transform_from_params, val_scale
from pipeline.evaluation.metrics import mean_iou
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.models.predict import autocast, validate
from pipeline.training.run_data import load_run_data

SNAPSHOT_NAME = re.compile(r"^swa_(\d+)\.pt$")


@dataclass(frozen=True)
class Snapshot:
    """One SWA snapshot file and the iteration in its name (optimizer steps done)."""

    iteration: int
    path: Path


def list_snapshots(snapshot_dir: str | Path) -> list[Snapshot]:
    """The ``swa_<iter>.pt`` files of ``snapshot_dir`` sorted by iteration ([] when none)."""
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        return []
    found = [(SNAPSHOT_NAME.match(p.name), p) for p in snapshot_dir.iterdir() if p.is_file()]
    return sorted((Snapshot(int(m.group(1)), p) for m, p in found if m),
                  key=lambda s: s.iteration)


def select_snapshots(snapshots: Sequence[Snapshot], *, last: int | None = None,
                     iters: tuple[int | None, int | None] | None = None) -> list[Snapshot]:
    """Keep the snapshots whose iteration lies in ``iters`` (inclusive ``(lo, hi)``, either end
    None = open), then the last ``last`` of those; all when both are None."""
    chosen = sorted(snapshots, key=lambda s: s.iteration)
    if iters is not None:
        lo, hi = iters
        if lo is not None and hi is not None and lo > hi:
            raise PipelineError(f"--iters {lo}:{hi}: the low end is above the high end")
        chosen = [s for s in chosen if (lo is None or s.iteration >= lo)
                  and (hi is None or s.iteration <= hi)]
    if last is not None:
        if last < 1:
            raise PipelineError(f"--last must be >= 1, got {last}")
        chosen = chosen[-last:]
    if not chosen:
        available = ", ".join(str(s.iteration) for s in snapshots) or "none"
        lo, hi = iters if iters is not None else (None, None)
        raise PipelineError(f"no SWA snapshot in iterations {'' if lo is None else lo}:"
                            f"{'' if hi is None else hi} (available: {available})")
    return chosen


# ----------------------------------------------------------------------------- averaging
class _RunningMean:
    """Float64 running sum of floating tensors; other tensors are replaced by each new one."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.count = 0
        self.first_label = ""

    def add(self, state: Mapping[str, torch.Tensor], label: str) -> None:
        if not self.count:
            self.first_label = label
            self.dtypes = {k: v.dtype for k, v in state.items()}
            self.sums = {k: (v.detach().to("cpu", torch.float64) if v.is_floating_point()
                             else v.detach().cpu().clone()) for k, v in state.items()}
            self.count = 1
            return
        missing = sorted(set(self.sums) - set(state))
        extra = sorted(set(state) - set(self.sums))
        if missing or extra:
            what = (f"missing {', '.join(missing[:3])}" if missing else
                    f"unexpected {', '.join(extra[:3])}")
            raise PipelineError(f"{label}: weights differ from {self.first_label} ({what}); "
                                f"snapshots of different architectures cannot be averaged")
        for key, value in state.items():
            ref = self.sums[key]
            if value.shape != ref.shape or value.dtype != self.dtypes[key]:
                raise PipelineError(
                    f"{label}: tensor '{key}' is {value.dtype} {list(value.shape)} but "
                    f"{self.dtypes[key]} {list(ref.shape)} in {self.first_label}; snapshots of "
                    f"different architectures cannot be averaged")
        for key, value in state.items():
            if value.is_floating_point():
                self.sums[key] += value.detach().to("cpu", torch.float64)
            else:
                self.sums[key] = value.detach().cpu().clone()
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise PipelineError("nothing to average (no state dict given)")
        return {k: (v / self.count).to(self.dtypes[k]) if self.dtypes[k].is_floating_point
                else v for k, v in self.sums.items()}


def average_state_dicts(states: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Equal-weight mean of state dicts with the same keys, shapes and dtypes (consumed one at
    a time). Floating tensors are averaged in float64 and cast back; integer tensors come from
    the last state dict."""
    mean = _RunningMean()
    for i, state in enumerate(states):
        mean.add(state, f"state dict #{i}")
    return mean.mean()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def average_checkpoints(paths: Sequence[str | Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """Average the weights of checkpoints of one architecture (see :func:`average_state_dicts`).

    Every checkpoint must have the first one's ``config["model"]`` spec, fold and seed, and the
    same tensor keys and shapes; otherwise, or for an unreadable file, a PipelineError names
    the file. Returns ``(state_dict, info)``: ``info["reference"]`` is the first checkpoint
    without its weights (config, classes, fold, seed ...), ``info["files"]`` the file names and
    ``info["iterations"]`` each checkpoint's iteration.
    """
    if not paths:
        raise PipelineError("no checkpoint to average")
    mean, reference, iterations = _RunningMean(), None, []
    for path in paths:
        ckpt = load_checkpoint(path)
        spec = (ckpt.get("config") or {}).get("model")
        if reference is None:
            if not spec:
                raise PipelineError(f"{path}: config has no 'model' spec to rebuild the network")
            reference = {k: v for k, v in ckpt.items() if k != "model"}
            ref_spec = spec
        elif spec != ref_spec:
            spec = spec or {}
            diffs = [f"{k} {_short(ref_spec.get(k))} vs {_short(spec.get(k))}"
                     for k in sorted(set(ref_spec) | set(spec)) if ref_spec.get(k) != spec.get(k)]
            raise PipelineError(f"{path}: another architecture than {paths[0]} "
                                f"({'; '.join(diffs[:3])}); snapshots of different "
                                f"architectures cannot be averaged")
        for key in ("fold", "seed"):
            if ckpt.get(key) != reference.get(key):
                raise PipelineError(f"{path}: from another run than {paths[0]} ({key} "
                                    f"{ckpt.get(key)!r} vs {reference.get(key)!r})")
        mean.add(ckpt["model"], str(path))
        iterations.append(int(ckpt.get("iteration", 0)))
        del ckpt  # one checkpoint in memory at a time
    return mean.mean(), {"reference": reference, "files": [Path(p).name for p in paths],
                         "iterations": iterations}


# ----------------------------------------------------------------------------- BatchNorm
def has_batchnorm(model: nn.Module) -> bool:
    """True when some BatchNorm layer (any ``_BatchNorm``, SyncBN included) keeps running
    statistics, i.e. when averaged weights need a re-estimation pass."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def update_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], *,
                     device: torch.device | None = None, amp: bool | str = False) -> bool:
    """Reset and re-estimate every BatchNorm's running mean/var over ``batches``.

    ``batches`` yields images ``[N, C, H, W]`` (tensors, as ``update_bn`` expects; not our
    dataset dicts). ``torch.optim.swa_utils.update_bn`` runs the model in train mode with BN
    ``momentum=None``, so each running statistic ends as the plain mean over batches of the
    batch statistic (every batch weighs the same; the variance is the unbiased batch variance)
    and ``num_batches_tracked`` counts the batches. The forward runs under the training's
    autocast setting (``amp``: :func:`pipeline.models.predict.resolve_amp`). Returns False,
    touching nothing, when the model has no BatchNorm; raises PipelineError when ``batches`` is empty.
    """
    if not has_batchnorm(model):
        return False
    counted = [0]

    def count(it: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for x in it:
            counted[0] += 1
            yield x

    device = torch.device(device) if device is not None else next(model.parameters()).device
    with autocast(device, amp):
        update_bn(count(batches), model, device=device)
    if not counted[0]:  # update_bn has reset the statistics to mean 0 / var 1: not usable
        raise PipelineError("no batch to re-estimate BatchNorm statistics from")
    return True


def train_image_batches(frames: Sequence[Frame], *, classes: ClassInfo, augment: Mapping[str, Any],
                        batch_size: int, seed: int, num_batches: int | None = None,
                        num_workers: int = 0, progress: bool = True,
                        source: str = "augment") -> Iterator[torch.Tensor]:
    """Images ``[batch_size, 3, h, w]`` float (normalized) of the training stream of ``seed``.

    The run's train transform (``augment``: crop, scale, flip ...) on the same seeded stream
    as training (see :mod:`pipeline.data.dataset`): deterministic for a given seed. By default
    ``ceil(len(frames) / batch_size)`` full batches, one pass over every frame (the last
    batch wraps into the next epoch); ``num_batches`` sets the count.
    """
    if num_batches is None:
        num_batches = math.ceil(len(frames) / batch_size)
    dataset = SegmentationDataset(frames, classes=classes,
                                  transform=transform_from_params(augment, train=True, source=source))
    loader = build_loader(dataset, batch_size=batch_size, num_workers=num_workers, seed=seed)
    batches = iter(loader)
    try:
        for batch in tqdm(itertools.islice(batches, num_batches), total=num_batches,
                          desc="BatchNorm statistics", unit="batch", disable=not progress or None,
                          mininterval=1.0):
            yield batch["image"]
    finally:
        del batches  # shuts the workers down


# ----------------------------------------------------------------------------- the stage
def _confusion(model: nn.Module, frames: Sequence[Frame], *, classes: ClassInfo, augment: Mapping,
               device: torch.device, amp: bool | str, progress: bool, desc: str) -> np.ndarray:
    """int64 [C, C] confusion matrix of ``model`` on ``frames`` (one view, validation scale)."""
    dataset = SegmentationDataset(frames, classes=classes,
                                  transform=transform_from_params(augment, train=False))
    batches = tqdm(build_eval_loader(dataset), desc=desc, unit="frame",
                   disable=not progress or None, mininterval=1.0)
    cm = validate(model.to(device), batches, num_classes=classes.num_classes, device=device,
                  amp=amp, ignore_index=classes.ignore_index, scale=val_scale(augment))
    return np.asarray(cm, dtype=np.int64)


def _recorded_confusion(path: Path, num_classes: int) -> np.ndarray | None:
    """The validation confusion matrix training stored in ``last.pt`` for its own weights (the
    same val frames, transform and scale as :func:`_confusion`), or None when it holds none."""
    ckpt = load_checkpoint(path)
    metric = ckpt.get("metric") or {}
    if metric.get("cm") is None or metric.get("iter") != ckpt.get("iteration"):
        return None
    cm = np.asarray(metric["cm"], dtype=np.int64)
    return cm if cm.shape == (num_classes, num_classes) else None


def average_run(*, run_dir: str | Path, data_dir: str | Path, folds_path: str | Path,
                device: torch.device, last: int | None = None,
                iters: tuple[int | None, int | None] | None = None,
                bn_batches: int | None = None, num_workers: int = 0,
                progress: bool = True) -> dict:
    """SWA of one run: average the selected snapshots, re-estimate BatchNorm, validate, save.

    Writes ``run_dir/swa.pt`` (a checkpoint rebuilt from its own config; ``extra["swa"]``
    lists the averaged files and iterations and whether BN was re-estimated) and
    ``run_dir/swa_metrics.json`` (``last_miou``, ``swa_miou``, ``gain``, ``snapshots``,
    ``bn_updated``; mIoUs are None for a fold-``all`` run, which has no validation frames),
    both only once everything succeeded. ``bn_batches`` None: one pass over the training
    frames. Returns the metrics.
    """
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise PipelineError(f"{paths.root}: run directory not found")
    snapshots = list_snapshots(paths.snapshots)
    if not snapshots:
        raise PipelineError(f"{paths.snapshots}: no SWA snapshots (swa_<iter>.pt); the run's "
                            f"model config needs swa.iters > 0 (train it again with an SWA phase)")
    chosen = select_snapshots(snapshots, last=last, iters=iters)
    state, info = average_checkpoints([s.path for s in chosen])
    ref = info["reference"]
    run_cfg = (ref.get("config") or {}).get("run") or {}
    fold, seed = ref.get("fold"), int(ref.get("seed") or 0)
    augment, amp = run_cfg.get("augment") or {}, run_cfg.get("amp", False)
    if fold != ALL_FOLDS and not paths.last.is_file():  # fail before the work, not after
        raise PipelineError(f"{paths.last}: checkpoint not found (needed to compare with SWA)")
    model, _ = model_from_checkpoint({**ref, "model": state})
    model.to(device)

    bn_updated, data = False, None
    if has_batchnorm(model) or fold != ALL_FOLDS:
        data_dir = Path(data_dir)
        data = load_run_data(manifest=data_dir / "manifest.csv", classes_path=data_dir / "classes.json",
                             counts_path=data_dir / "class_counts.npz",
                             folds_path=Path(folds_path), fold=fold)
        if list((ref.get("classes") or {}).get("names") or []) != list(data.classes.names):
            raise PipelineError(f"{data_dir / 'classes.json'}: classes differ from those the run "
                                f"{paths.root} was trained with")
    if has_batchnorm(model):
        batch_size = run_cfg.get("batch_size")
        if not augment.get("crop") or not batch_size:
            raise PipelineError(f"{chosen[0].path}: config has no run.augment.crop / "
                                f"run.batch_size for the BatchNorm pass")
        images = train_image_batches(data.train_frames, classes=data.classes, augment=augment,
                                     batch_size=int(batch_size), seed=seed, num_batches=bn_batches,
                                     num_workers=num_workers, progress=progress,
                                     source=f"{chosen[0].path}: run.augment")
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # dropout in train mode: seeded, not leaked
            torch.manual_seed(seed)
            bn_updated = update_batchnorm(model, images, device=device, amp=amp)

    last_miou = swa_miou = last_cm = swa_cm = None
    if fold != ALL_FOLDS:
        kw = dict(classes=data.classes, augment=augment, device=device, amp=amp, progress=progress)
        last_cm = _recorded_confusion(paths.last, data.classes.num_classes)
        if last_cm is None:
            last_model, _ = model_from_checkpoint(paths.last)
            last_cm = _confusion(last_model, data.val_frames, desc="validate last.pt", **kw)
            del last_model
        swa_cm = _confusion(model, data.val_frames, desc="validate swa", **kw)
        last_miou, swa_miou = mean_iou(last_cm), mean_iou(swa_cm)
    gain = swa_miou - last_miou if swa_miou is not None else None
    swa_info = {"snapshots": info["files"], "iterations": info["iterations"],
                "bn_updated": bn_updated}
    save_checkpoint(paths.swa, model=model, config=ref["config"], classes=ref["classes"],
                    fold=fold, seed=seed, iteration=info["iterations"][-1],
                    metric={"miou": swa_miou} if swa_miou is not None else None,
                    rng_state=False, extra={"swa": swa_info})
    # the matrices let the report pool SWA vs last over a member's folds (the ledger)
    metrics = {"last_miou": last_miou, "swa_miou": swa_miou, "gain": gain,
               "snapshots": len(chosen), "bn_updated": bn_updated,
               "last_cm": None if last_cm is None else last_cm.tolist(),
               "swa_cm": None if swa_cm is None else swa_cm.tolist()}
    write_json(paths.swa_metrics, metrics)
    return metrics
